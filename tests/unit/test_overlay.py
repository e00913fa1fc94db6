"""Secondary Capture overlay: checked by dciodvfy, pixels compared with the source and label map."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from pacsai.inference.bundle import BundleInfo
from pacsai.inference.volume import load_series
from pacsai.phantom import write_phantom
from pacsai.reporting import BANNER, build_overlay, result_uid
from pacsai.reporting.outputs import WrittenObject, write_result_objects
from pacsai.reporting.overlay import contour_mask, text_mask
from tests.dicom_checks import PhantomCase, dciodvfy

YELLOW = (255, 255, 0)
PATIENT_AND_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)
UID_PARTS = ("1.2.3.4", "ct_abdomen_demo 0.1.0")


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("overlay")


@pytest.fixture(scope="module")
def overlay(ct: PhantomCase, ct_bundle: BundleInfo) -> list[hd.sc.SCImage]:
    return build_overlay(
        sources=ct.datasets,
        volume=ct.volume,
        label_map=label_map_of(ct),
        bundle=ct_bundle,
        uid_parts=UID_PARTS,
    )


def label_map_of(case: PhantomCase) -> np.ndarray:
    """The phantom's truth as the model output, less its first and last 8 slices.

    Every slice of the phantom holds some organ; a model that found nothing on the outer slices
    gives slices without findings.
    """
    assert case.label_map is not None
    label_map = case.label_map.copy()
    label_map[:8] = label_map[-8:] = 0
    return label_map


def slices_with_findings(case: PhantomCase) -> list[int]:
    return np.flatnonzero(label_map_of(case).any(axis=(1, 2))).tolist()


def expected_grey(hu: np.ndarray, centre: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1, written out independently of the module under test."""
    y = ((hu.astype(np.float64) - (centre - 0.5)) / (width - 1) + 0.5) * 255
    clipped: np.ndarray = np.clip(y, 0, 255)
    return clipped


def outline(labels: np.ndarray, value: int) -> np.ndarray:
    """Pixels of ``value`` with a 4-neighbour (inside the image) of another value."""
    mask = labels == value
    edge: np.ndarray = np.zeros_like(mask)
    rows, columns = labels.shape
    for r, c in zip(*np.nonzero(mask), strict=True):
        for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1)):
            rr, cc = r + dr, c + dc
            if 0 <= rr < rows and 0 <= cc < columns and labels[rr, cc] != value:
                edge[r, c] = True
    return edge


def interior(labels: np.ndarray, value: int, depth: int = 2) -> np.ndarray:
    """Pixels of ``value`` whose whole (2 * depth + 1)-square neighbourhood is ``value``."""
    mask = labels == value
    padded = np.pad(mask, depth)
    result: np.ndarray = np.ones_like(mask)
    for dr in range(-depth, depth + 1):
        for dc in range(-depth, depth + 1):
            result &= padded[depth + dr : depth + dr + mask.shape[0], depth + dc :][
                :, : mask.shape[1]
            ]
    return result


def is_grey(rgb: np.ndarray) -> np.ndarray:
    result: np.ndarray = (rgb[..., 0] == rgb[..., 1]) & (rgb[..., 1] == rgb[..., 2])
    return result


def free_rows(rows: int) -> slice:
    """Rows of a 128-row overlay clear of the banner (4 lines) and the legend (3 lines)."""
    assert rows == 128
    return slice(40, rows - 30)


# --- conformance and header -----------------------------------------------------------------------


def test_overlay_passes_dciodvfy(overlay: list[hd.sc.SCImage], scratch: Path) -> None:
    for index in (0, len(overlay) // 2, len(overlay) - 1):
        path = scratch / f"overlay{index}.dcm"
        overlay[index].save_as(path, enforce_file_format=True)
        verification = dciodvfy(path)
        assert not verification.errors, verification.report()


def test_one_image_per_slice_with_findings_referencing_its_source(
    overlay: list[hd.sc.SCImage], ct: PhantomCase
) -> None:
    slices = slices_with_findings(ct)
    assert 0 < len(slices) < ct.volume.array.shape[0]
    assert len(overlay) == len(slices)
    by_uid = {str(ds.SOPInstanceUID): ds for ds in ct.datasets}
    for image, k in zip(overlay, slices, strict=True):
        assert image.InstanceNumber == k + 1
        (reference,) = image.SourceImageSequence
        source = by_uid[reference.ReferencedSOPInstanceUID]
        assert reference.ReferencedSOPInstanceUID == ct.volume.sources[k][0]
        assert reference.ReferencedSOPClassUID == source.SOPClassUID
        assert "ReferencedFrameNumber" not in reference
        assert reference.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"


def test_overlay_header(
    overlay: list[hd.sc.SCImage], ct: PhantomCase, ct_bundle: BundleInfo
) -> None:
    source = ct.datasets[0]
    series = {str(image.SeriesInstanceUID) for image in overlay}
    assert len(series) == 1
    assert series != {str(source.SeriesInstanceUID)}
    assert len({str(image.SOPInstanceUID) for image in overlay}) == len(overlay)
    for image in overlay:
        for keyword in PATIENT_AND_STUDY:
            assert image.get(keyword) == source.get(keyword), keyword
        assert image.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
        assert list(image.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert image.ConversionType == "WSD"
        assert image.BurnedInAnnotation == "YES"
        assert image.SeriesNumber == 9903
        assert image.SeriesDescription == (
            "AI overlay ct_abdomen_demo 0.1.0 (not for primary diagnosis)"
        )
        assert len(image.SeriesDescription) <= 64
        assert (image.PhotometricInterpretation, image.SamplesPerPixel) == ("RGB", 3)
        assert (image.BitsAllocated, image.BitsStored) == (8, 8)
        assert (image.Rows, image.Columns) == ct.volume.array.shape[1:]
        assert np.allclose(np.asarray(image.PixelSpacing, float), source.PixelSpacing)
        assert list(image.PatientOrientation) == ["L", "P"]
        assert ct_bundle.display_version in image.DerivationDescription
        assert "centre 40, width 400" in image.DerivationDescription
        assert "not for primary diagnosis" in image.DerivationDescription
        assert image.Manufacturer == "pacsai"


def test_overlay_reads_back(overlay: list[hd.sc.SCImage], scratch: Path) -> None:
    image = overlay[len(overlay) // 2]
    path = scratch / "read_back.dcm"
    image.save_as(path, enforce_file_format=True)
    read = pydicom.dcmread(path)
    np.testing.assert_array_equal(read.pixel_array, image.pixel_array)
    assert read.SourceImageSequence[0].ReferencedSOPInstanceUID == (
        image.SourceImageSequence[0].ReferencedSOPInstanceUID
    )


# --- pixels ---------------------------------------------------------------------------------------


def liver_slice(case: PhantomCase) -> int:
    return int(np.argmax((label_map_of(case) == 1).sum(axis=(1, 2))))


def test_contours_carry_the_label_colour_and_the_inside_stays_grey(
    overlay: list[hd.sc.SCImage], ct: PhantomCase, ct_bundle: BundleInfo
) -> None:
    k = liver_slice(ct)
    rgb = overlay[slices_with_findings(ct).index(k)].pixel_array
    labels = label_map_of(ct)[k]
    free = free_rows(labels.shape[0])
    liver = ct_bundle.labels[0]
    assert (liver.name, liver.value) == ("liver", 1)

    edge = outline(labels, 1)
    edge[: free.start] = edge[free.stop :] = False
    assert edge.sum() > 20
    assert np.all(rgb[edge] == liver.color)

    inside = interior(labels, 1)
    inside[: free.start] = inside[free.stop :] = False
    assert inside.sum() > 20
    assert np.all(is_grey(rgb[inside]))
    grey = expected_grey(ct.volume.array[k][inside], 40, 400)
    np.testing.assert_allclose(rgb[inside][:, 0], grey, atol=1)

    # everywhere clear of text and of any contour, the image is the windowed source
    contours = np.zeros_like(edge)
    for label in ct_bundle.labels:
        contours |= outline(labels, label.value)
    plain = ~contours
    plain[: free.start] = plain[free.stop :] = False
    assert np.all(is_grey(rgb[plain]))
    np.testing.assert_allclose(
        rgb[plain][:, 0], expected_grey(ct.volume.array[k][plain], 40, 400), atol=1
    )


def test_banner_and_legend_are_burned_in(
    overlay: list[hd.sc.SCImage], ct: PhantomCase, ct_bundle: BundleInfo
) -> None:
    k = liver_slice(ct)
    rgb = overlay[slices_with_findings(ct).index(k)].pixel_array
    # 128 columns hold 21 characters per line: the banner wraps after "FOR".
    first = text_mask("AI RESULT - NOT FOR")
    area = rgb[1 : 1 + first.shape[0], 1 : 1 + first.shape[1]]
    assert np.all(area[first] == YELLOW)
    assert np.all(area[~first] == 0)
    banner = rgb[:36]
    assert (banner == YELLOW).all(axis=-1).sum() == sum(
        int(text_mask(text).sum())
        for text in ("AI RESULT - NOT FOR", "PRIMARY DIAGNOSIS", "CT_ABDOMEN_DEMO")
    ) + int(text_mask(ct_bundle.display_version.upper()).sum())
    # the legend names the labels on the slice, each in its colour
    legend = rgb[-30:, :60]
    for label in ct_bundle.labels:
        present = bool(np.any(label_map_of(ct)[k] == label.value))
        assert bool(np.any((legend == label.color).all(axis=-1))) == present, label.name


def test_text_mask_draws_known_glyphs() -> None:
    mask = text_mask("I-", scale=2)
    assert mask.shape == (14, 22)
    # "I": a bar three pixels wide at top and bottom, one in the middle; "-": row 3
    np.testing.assert_array_equal(mask[::2, :10:2].astype(int)[0], [0, 1, 1, 1, 0])
    np.testing.assert_array_equal(mask[::2, 12::2].astype(int)[3], [1, 1, 1, 1, 1])
    assert not mask[:, 10:12].any()  # the gap between characters
    assert np.array_equal(text_mask("a"), text_mask("A"))
    assert np.array_equal(text_mask("~"), text_mask("?"))
    assert BANNER == "AI RESULT - NOT FOR PRIMARY DIAGNOSIS"


def test_contour_mask() -> None:
    labels = np.zeros((9, 9), dtype=np.uint8)
    labels[2:7, 2:7] = 1
    labels[4, 4] = 2
    one = contour_mask(labels, 1)
    ring = np.zeros_like(one)
    ring[2:7, 2:7] = True
    ring[3:6, 3:6] = False
    ring[[3, 4, 4, 5], [4, 3, 5, 4]] = True  # label 1 next to label 2
    ring[4, 4] = True  # label 2 itself, all of whose neighbours differ
    np.testing.assert_array_equal(one, ring)
    two = contour_mask(labels, 2)
    np.testing.assert_array_equal(two, labels > 0)  # the 5x5 square is at most 2 deep
    assert not two[labels == 0].any()
    # a label on the image border is not outlined along the border
    border = np.ones((4, 4), dtype=np.uint8)
    assert not contour_mask(border).any()


# --- UIDs -----------------------------------------------------------------------------------------


def test_same_inputs_give_the_same_uids(
    overlay: list[hd.sc.SCImage], ct: PhantomCase, ct_bundle: BundleInfo
) -> None:
    def build(**uids: object) -> list[hd.sc.SCImage]:
        return build_overlay(
            sources=ct.datasets,
            volume=ct.volume,
            label_map=label_map_of(ct),
            bundle=ct_bundle,
            **uids,  # type: ignore[arg-type]
        )

    again = build(uid_parts=UID_PARTS)
    assert [i.SOPInstanceUID for i in again] == [i.SOPInstanceUID for i in overlay]
    assert again[0].SeriesInstanceUID == overlay[0].SeriesInstanceUID
    assert overlay[0].SeriesInstanceUID == result_uid(*UID_PARTS, "overlay series")
    assert again[0].PixelData == overlay[0].PixelData

    other = build(uid_parts=(*UID_PARTS[:1], "ct_abdomen_demo 0.2.0"))
    assert not {i.SOPInstanceUID for i in other} & {i.SOPInstanceUID for i in overlay}

    series = result_uid("explicit series")
    first, second = build(series_instance_uid=series), build(series_instance_uid=series)
    assert first[0].SeriesInstanceUID == series
    assert [i.SOPInstanceUID for i in first] == [i.SOPInstanceUID for i in second]

    random_a, random_b = build(), build()
    assert random_a[0].SeriesInstanceUID != random_b[0].SeriesInstanceUID
    assert random_a[0].SOPInstanceUID != random_b[0].SOPInstanceUID

    with pytest.raises(ValueError, match="not both"):
        build(series_instance_uid=series, uid_parts=UID_PARTS)


# --- options --------------------------------------------------------------------------------------


def test_all_slices_and_an_explicit_window(ct: PhantomCase, ct_bundle: BundleInfo) -> None:
    images = build_overlay(
        sources=ct.datasets,
        volume=ct.volume,
        label_map=label_map_of(ct),
        bundle=ct_bundle,
        only_slices_with_findings=False,
        window=(0, 2000),
    )
    assert [image.InstanceNumber for image in images] == list(
        range(1, ct.volume.array.shape[0] + 1)
    )
    empty = next(k for k in range(len(images)) if not label_map_of(ct)[k].any())
    rgb = images[empty].pixel_array
    rows = free_rows(rgb.shape[0])
    assert np.all(is_grey(rgb[rows]))
    np.testing.assert_allclose(
        rgb[rows][..., 0], expected_grey(ct.volume.array[empty][rows], 0, 2000), atol=1
    )
    assert "centre 0, width 2000" in images[empty].DerivationDescription


def test_empty_label_map_gives_no_images(ct: PhantomCase, ct_bundle: BundleInfo) -> None:
    empty = np.zeros_like(label_map_of(ct))
    assert (
        build_overlay(sources=ct.datasets, volume=ct.volume, label_map=empty, bundle=ct_bundle)
        == []
    )


def test_cr_source(ct_bundle: BundleInfo, tmp_path: Path) -> None:
    study = write_phantom("cr", tmp_path / "cr", seed=1)
    volume = load_series(list(study.paths))
    datasets = [pydicom.dcmread(path) for path in study.paths]
    label_map = np.zeros(volume.array.shape, dtype=np.uint8)
    label_map[0, 60:120, 50:110] = 1
    bundle = dataclasses.replace(ct_bundle, labels=ct_bundle.labels[:1])

    (image,) = build_overlay(sources=datasets, volume=volume, label_map=label_map, bundle=bundle)
    image.save_as(tmp_path / "cr_overlay.dcm", enforce_file_format=True)
    verification = dciodvfy(tmp_path / "cr_overlay.dcm")
    assert not verification.errors, verification.report()

    source = datasets[0]
    assert image.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert image.SourceImageSequence[0].ReferencedSOPClassUID == source.SOPClassUID
    assert list(image.PatientOrientation) == list(source.PatientOrientation)
    assert "PixelSpacing" not in image  # the CR has Imager Pixel Spacing only
    rgb = image.pixel_array
    assert rgb.shape == (256, 256, 3)
    assert np.all(rgb[60, 50:110] == bundle.labels[0].color)
    assert np.all(is_grey(rgb[62:118, 52:108]))
    # not CT: the window spans the 1st to 99th percentile of the image
    grey = rgb[20:-20, :, 0][is_grey(rgb[20:-20])]
    low, high = np.percentile(volume.array[0], [1, 99])
    assert grey.min() == 0 and grey.max() == 255
    assert f"centre {(low + high) / 2 + 0.5:g}" in image.DerivationDescription


# --- refused input --------------------------------------------------------------------------------


def test_label_map_of_another_shape_is_refused(ct: PhantomCase, ct_bundle: BundleInfo) -> None:
    with pytest.raises(ValueError, match=r"label_map has shape \(63, 128, 128\), the volume"):
        build_overlay(
            sources=ct.datasets,
            volume=ct.volume,
            label_map=label_map_of(ct)[1:],
            bundle=ct_bundle,
        )


def test_bad_window_and_uid_parts_are_refused(ct: PhantomCase, ct_bundle: BundleInfo) -> None:
    arguments = {
        "sources": ct.datasets,
        "volume": ct.volume,
        "label_map": label_map_of(ct),
        "bundle": ct_bundle,
    }
    with pytest.raises(ValueError, match="width above 0"):
        build_overlay(**arguments, window=(40, 0))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"\(center, width\) pair"):
        build_overlay(**arguments, window=(40,))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="uid_parts must be a sequence of str"):
        build_overlay(**arguments, uid_parts="1.2.3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not among the"):
        build_overlay(**{**arguments, "sources": ct.datasets[1:]})  # type: ignore[arg-type]


def test_a_result_with_an_overlay_output_writes_seg_sr_and_one_image_per_finding_slice(
    ct: PhantomCase, ct_bundle: BundleInfo, tmp_path: Path
) -> None:
    """The overlay through the job's path: series UIDs derived, the same on a re-run."""
    label_map = label_map_of(ct)

    def write(results_dir: Path) -> list[WrittenObject]:
        return write_result_objects(
            results_dir=results_dir,
            folder=Path("result-1"),
            sources=ct.datasets,
            volume=ct.volume,
            bundle=ct_bundle,
            route_name="ct",
            label_map=label_map,
            probabilities=None,
            outputs=["seg", "sr", "overlay"],
        )

    written = write(tmp_path / "first")
    overlays = [o for o in written if o.kind == "OVERLAY"]
    assert sorted({o.kind for o in written}) == ["OVERLAY", "SEG", "SR"]
    assert len(overlays) == int(np.count_nonzero(label_map.reshape(len(label_map), -1).any(axis=1)))
    assert len({o.series_instance_uid for o in overlays}) == 1
    assert overlays[0].series_instance_uid not in {
        o.series_instance_uid for o in written if o.kind != "OVERLAY"
    }
    again = write(tmp_path / "again")
    assert [o.sop_instance_uid for o in again] == [o.sop_instance_uid for o in written]
    first = pydicom.dcmread(tmp_path / "first" / overlays[0].path)
    assert dciodvfy(tmp_path / "first" / overlays[0].path).errors == []
    assert first.SeriesInstanceUID == overlays[0].series_instance_uid
