"""Write a phantom as a DICOM study: the images, and the ground truth beside them.

One call writes one new study (fresh Study, Series, SOP Instance and Frame of Reference UIDs):

``outdir/<SERIES>/IMG0001.dcm ...``
    The images, one file per slice (CT Image Storage, MR Image Storage) or one file
    (CR Image Storage), explicit VR little endian with a PS3.10 file meta header. ``<SERIES>`` is
    ``CT_AXIAL``, ``CT_AXIAL_REVERSED``, ``CT_SAGITTAL``, ``CT_CORONAL``, ``CT_OBLIQUE``, the same
    for ``MR_``, or ``CR_PA``.
``outdir/<SERIES>_TRUTH/SEG0001.dcm``
    CT and MR: a BINARY Segmentation (PS3.3 A.51) of the label volume, one segment per label,
    referencing the images; it is a separate series in the same study.
``outdir/CR_PA_TRUTH/truth.json``
    CR: ``{"nodule": bool, "effusion": bool}``.

Keeping the truth out of the image folder lets ``storescu +sd outdir/CT_AXIAL`` send the images
alone.
"""

from __future__ import annotations

import datetime
import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

import pacsai
from pacsai.phantom.anatomy import CTAbdomen, MRBrain
from pacsai.phantom.chest import ChestFindings, ChestRadiograph
from pacsai.phantom.grid import Grid

__all__ = [
    "CT_FOV_MM",
    "CT_SPACING_MM",
    "KINDS",
    "MR_FOV_MM",
    "MR_SPACING_MM",
    "OBLIQUE_ANGLES_DEG",
    "ORIENTATIONS",
    "PhantomStudy",
    "default_grid",
    "write_phantom",
]

KINDS: Final = ("ct", "mr", "cr")
ORIENTATIONS: Final = ("axial", "axial-reversed", "sagittal", "coronal", "oblique")

#: CT: 128 x 128 pixels of 3 mm, 64 slices of 3 mm.
CT_FOV_MM: Final = (384.0, 384.0, 192.0)
CT_SPACING_MM: Final = 3.0
#: MR: 112 x 112 pixels of 2 mm, 96 slices of 2 mm (the head is about 150 x 190 x 170 mm).
MR_FOV_MM: Final = (224.0, 224.0, 192.0)
MR_SPACING_MM: Final = 2.0
#: Rotation of the oblique grids about x, y and z, degrees.
OBLIQUE_ANGLES_DEG: Final = (12.0, -9.0, 18.0)
#: CR: 256 x 256 pixels of 1.4 mm.
CR_SIZE: Final = 256
CR_SPACING_MM: Final = 1.4

CT_RESCALE_INTERCEPT: Final = -1024.0
_STORED_MAX: Final = 4095
_SERIES_NUMBERS: Final = {o: n for n, o in enumerate(ORIENTATIONS, start=1)}
_TRUTH_SERIES_OFFSET: Final = 100


@dataclass(frozen=True, eq=False)
class PhantomStudy:
    """What :func:`write_phantom` wrote.

    Attributes
    ----------
    kind : str
        ``"ct"``, ``"mr"`` or ``"cr"``.
    study_instance_uid, series_instance_uid : str
        Study Instance UID (0020,000D) and the image series' Series Instance UID (0020,000E).
    paths : tuple of pathlib.Path
        The image files in InstanceNumber order: one per slice (CT, MR) or one (CR).
    truth_path : pathlib.Path
        CT, MR: the DICOM SEG of :attr:`labels`; CR: ``truth.json``.
    labels : numpy.ndarray or None
        CT, MR: the uint8 label volume ``(slices, rows, columns)`` on :attr:`grid`, slice ``k``
        being the image ``paths[k]``; None for CR.
    findings : ChestFindings or None
        CR: what the radiograph shows; None for CT and MR.
    grid : Grid or None
        CT, MR: where the voxels lie; None for CR.
    """

    kind: str
    study_instance_uid: str
    series_instance_uid: str
    paths: tuple[Path, ...]
    truth_path: Path
    labels: npt.NDArray[np.uint8] | None
    findings: ChestFindings | None
    grid: Grid | None


def default_grid(
    kind: str,
    orientation: str = "axial",
    spacing: float | None = None,
    fov_mm: tuple[float, float, float] | None = None,
) -> Grid:
    """The grid :func:`write_phantom` uses for ``kind`` (``"ct"`` or ``"mr"``) and orientation.

    All orientations cover the same (L-R, A-P, S-I) field of view (``fov_mm``, else the kind's
    default) with the same isotropic spacing; the oblique grid is rotated by
    :data:`OBLIQUE_ANGLES_DEG` and enlarged to cover it.
    """
    if kind not in ("ct", "mr"):
        raise ValueError(f"kind must be 'ct' or 'mr' for a grid, got {kind!r}")
    fov, default = (CT_FOV_MM, CT_SPACING_MM) if kind == "ct" else (MR_FOV_MM, MR_SPACING_MM)
    fov = fov if fov_mm is None else fov_mm
    spacing = default if spacing is None else spacing
    if orientation == "axial":
        return Grid.axial(fov, spacing)
    if orientation == "axial-reversed":
        return Grid.axial(fov, spacing, reverse=True)
    if orientation == "sagittal":
        return Grid.sagittal(fov, spacing)
    if orientation == "coronal":
        return Grid.coronal(fov, spacing)
    if orientation == "oblique":
        return Grid.oblique(fov, spacing, angles_deg=OBLIQUE_ANGLES_DEG)
    raise ValueError(f"orientation must be one of {', '.join(ORIENTATIONS)}; got {orientation!r}")


def write_phantom(
    kind: str,
    outdir: Path,
    *,
    seed: int = 0,
    orientation: str = "axial",
    patient_id: str | None = None,
    noise: bool = True,
    spacing: float | None = None,
    fov_mm: tuple[float, float, float] | None = None,
) -> PhantomStudy:
    """Render a phantom and write it, with its ground truth, as a new DICOM study.

    Parameters
    ----------
    kind : str
        ``"ct"`` (:class:`~pacsai.phantom.anatomy.CTAbdomen`), ``"mr"``
        (:class:`~pacsai.phantom.anatomy.MRBrain`) or ``"cr"``
        (:class:`~pacsai.phantom.chest.ChestRadiograph`).
    outdir : pathlib.Path
        Where to write; created if missing. The series folders must not exist yet or be empty.
    seed : int
        Selects the body (and, for CR, the findings); the same seed gives the same pixels.
    orientation : str
        CT and MR: one of :data:`ORIENTATIONS`; CR ignores it.
    patient_id : str or None
        Patient ID (0010,0020); default ``PACSAI-PH-<KIND>-<seed>``.
    noise : bool
        Add the phantom's seeded noise.
    spacing : float or None
        CT and MR: isotropic voxel size in mm instead of the default (3 mm CT, 2 mm MR).
    fov_mm : tuple of float or None
        CT and MR: the field of view (L-R, A-P, S-I) in mm instead of the default
        (:data:`CT_FOV_MM`, :data:`MR_FOV_MM`), centred on the same point: with ``spacing`` it
        gives the grid's size (384 x 384 x 192 mm at 0.75 mm: 512 x 512 x 256 voxels).

    Returns
    -------
    PhantomStudy

    Raises
    ------
    ValueError
        If ``kind``, ``orientation``, ``seed`` or ``patient_id`` is not acceptable.
    FileExistsError
        If a series folder already holds files.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
    if kind != "cr" and orientation not in ORIENTATIONS:
        raise ValueError(
            f"orientation must be one of {', '.join(ORIENTATIONS)}; got {orientation!r}"
        )
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if patient_id is not None and (
        not patient_id or len(patient_id) > 64 or any(c in patient_id for c in "\\\r\n\t\f")
    ):
        raise ValueError(
            f"patient_id must be 1 to 64 characters without backslash or control characters "
            f"(a DICOM LO value), got {patient_id!r}"
        )
    header = _Header.create(kind, seed, patient_id)
    outdir = Path(outdir)
    if kind == "cr":
        return _write_cr(outdir, header, seed, noise)
    return _write_volume(kind, outdir, header, seed, orientation, noise, spacing, fov_mm)


# --- common modules -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Header:
    """The Patient, General Study and Patient Study attributes shared by all series of a study."""

    kind: str
    patient_name: str
    patient_id: str
    birth_date: datetime.date
    sex: str
    now: datetime.datetime
    study_instance_uid: str
    frame_of_reference_uid: str
    accession_number: str
    study_id: str

    @classmethod
    def create(cls, kind: str, seed: int, patient_id: str | None) -> _Header:
        # The same seed is always the same patient; the study is new each time.
        rng = np.random.default_rng([seed, 0x50415449])  # "PATI"
        birth = datetime.date(1940, 1, 1) + datetime.timedelta(days=int(rng.integers(0, 50 * 365)))
        return cls(
            kind=kind,
            patient_name=f"PHANTOM^{kind.upper()}^S{seed}",
            patient_id=patient_id or f"PACSAI-PH-{kind.upper()}-{seed}",
            birth_date=birth,
            sex=("F", "M")[int(rng.integers(0, 2))],
            now=datetime.datetime.now().replace(microsecond=0),
            study_instance_uid=generate_uid(),
            frame_of_reference_uid=generate_uid(),
            accession_number=f"PH{secrets.randbelow(10**10):010d}",
            study_id=f"PH{seed}"[:16],
        )

    @property
    def age(self) -> str:
        """Patient's Age (0010,1010) on the study date, ``nnnY``."""
        today = self.now.date()
        years = today.year - self.birth_date.year
        if (today.month, today.day) < (self.birth_date.month, self.birth_date.day):
            years -= 1
        return f"{years:03d}Y"

    def fill(self, ds: Dataset) -> None:
        """Patient, General Study and Patient Study modules (PS3.3 C.7.1.1, C.7.2.1, C.7.2.2)."""
        date, time = self.now.strftime("%Y%m%d"), self.now.strftime("%H%M%S")
        ds.PatientName = self.patient_name
        ds.PatientID = self.patient_id
        ds.PatientBirthDate = self.birth_date.strftime("%Y%m%d")
        ds.PatientSex = self.sex
        ds.PatientAge = self.age
        ds.StudyInstanceUID = self.study_instance_uid
        ds.StudyDate = date
        ds.StudyTime = time
        ds.ReferringPhysicianName = ""
        ds.StudyID = self.study_id
        ds.AccessionNumber = self.accession_number
        ds.StudyDescription = {
            "ct": "CT ABDOMEN PHANTOM",
            "mr": "MR BRAIN PHANTOM",
            "cr": "CHEST PA PHANTOM",
        }[self.kind]


def _ds(values: Sequence[float] | npt.NDArray[np.float64]) -> list[str]:
    """Decimal String values of at most 16 characters (PS3.5 6.2), no negative zero."""
    return [format_number_as_ds(float(v) + 0.0) for v in values]


def _new_dataset(sop_class_uid: UID, series_uid: str, modality: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class_uid
    ds.SOPClassUID = sop_class_uid
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    return ds


def _fill_series_and_equipment(
    ds: Dataset, header: _Header, *, series_number: int, description: str, body_part: str
) -> None:
    """General Series, General Equipment and SOP Common (PS3.3 C.7.3.1, C.7.5.1, C.12.1)."""
    date, time = header.now.strftime("%Y%m%d"), header.now.strftime("%H%M%S")
    ds.SeriesNumber = series_number
    ds.SeriesDescription = description
    ds.SeriesDate = date
    ds.SeriesTime = time
    ds.BodyPartExamined = body_part
    ds.Manufacturer = "pacsai phantom"
    ds.ManufacturerModelName = "pacsai"
    ds.SoftwareVersions = pacsai.__version__
    ds.DeviceSerialNumber = "0"
    ds.StationName = "PHANTOM"
    ds.InstanceCreationDate = date
    ds.InstanceCreationTime = time
    ds.ContentDate = date
    ds.ContentTime = time
    ds.AcquisitionDate = date
    ds.AcquisitionTime = time


def _fill_pixels(ds: Dataset, stored: npt.NDArray[np.uint16]) -> None:
    """Image Pixel module (PS3.3 C.7.6.3): 12 of 16 bits, unsigned, MONOCHROME2."""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.SmallestImagePixelValue = int(stored.min())
    ds.LargestImagePixelValue = int(stored.max())
    ds.PixelData = np.ascontiguousarray(stored, dtype="<u2").tobytes()


def _to_stored(values: npt.NDArray[np.float32], offset: float = 0.0) -> npt.NDArray[np.uint16]:
    stored: npt.NDArray[np.uint16] = np.clip(np.rint(values - offset), 0, _STORED_MAX).astype(
        np.uint16
    )
    return stored


def _prepare(directory: Path) -> None:
    if directory.exists() and any(directory.iterdir()):
        raise FileExistsError(
            f"{directory} already holds files: write the phantom to an empty or new directory"
        )
    directory.mkdir(parents=True, exist_ok=True)


def _save(ds: Dataset, path: Path) -> None:
    ds.save_as(path, enforce_file_format=True)


# --- CT and MR ------------------------------------------------------------------------------------


def _write_volume(
    kind: str,
    outdir: Path,
    header: _Header,
    seed: int,
    orientation: str,
    noise: bool,
    spacing: float | None = None,
    fov_mm: tuple[float, float, float] | None = None,
) -> PhantomStudy:
    grid = default_grid(kind, orientation, spacing, fov_mm)
    phantom: CTAbdomen | MRBrain = CTAbdomen(seed) if kind == "ct" else MRBrain(seed)
    image, labels = phantom.render(grid, noise=noise)
    name = f"{kind.upper()}_{orientation.upper().replace('-', '_')}"
    series_dir, truth_dir = outdir / name, outdir / f"{name}_TRUTH"
    _prepare(series_dir)
    _prepare(truth_dir)
    series_uid = generate_uid()
    series_number = _SERIES_NUMBERS[orientation]
    stored = _to_stored(image, CT_RESCALE_INTERCEPT if kind == "ct" else 0.0)
    datasets = []
    paths = []
    for k in range(grid.shape[0]):
        ds = _slice_dataset(kind, header, grid, k, stored[k], series_uid, orientation)
        path = series_dir / f"IMG{k + 1:04d}.dcm"
        _save(ds, path)
        datasets.append(ds)
        paths.append(path)
    truth_path = truth_dir / "SEG0001.dcm"
    _save(_segmentation(kind, datasets, labels, series_number + _TRUTH_SERIES_OFFSET), truth_path)
    return PhantomStudy(
        kind=kind,
        study_instance_uid=header.study_instance_uid,
        series_instance_uid=series_uid,
        paths=tuple(paths),
        truth_path=truth_path,
        labels=labels,
        findings=None,
        grid=grid,
    )


def _slice_dataset(
    kind: str,
    header: _Header,
    grid: Grid,
    k: int,
    stored: npt.NDArray[np.uint16],
    series_uid: str,
    orientation: str,
) -> Dataset:
    """One slice: CT Image IOD (PS3.3 A.3) or MR Image IOD (PS3.3 A.4)."""
    ct = kind == "ct"
    ds = _new_dataset(CTImageStorage if ct else MRImageStorage, series_uid, kind.upper())
    header.fill(ds)
    _fill_series_and_equipment(
        ds,
        header,
        series_number=_SERIES_NUMBERS[orientation],
        description=(
            f"{'CT ABDOMEN' if ct else 'MR BRAIN FLAIR'} PHANTOM {orientation.upper()} "
            f"{grid.spacing[0]:g} mm"
        ),
        body_part="ABDOMEN" if ct else "BRAIN",
    )
    ds.PatientPosition = "HFS"
    # Frame of Reference (C.7.4.1): every series of the study shares the patient space.
    ds.FrameOfReferenceUID = header.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    # General Image (C.7.6.1)
    ds.InstanceNumber = k + 1
    ds.AcquisitionNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL" if ct else "OTHER"]
    # Image Plane (C.7.6.2)
    position = grid.slice_position(k)
    ds.ImagePositionPatient = _ds(position)
    ds.ImageOrientationPatient = _ds([*grid.row_direction, *grid.column_direction])
    ds.PixelSpacing = _ds([grid.spacing[1], grid.spacing[2]])
    ds.SliceThickness = _ds([grid.spacing[0]])[0]
    ds.SliceLocation = _ds([float(position @ grid.normal)])[0]
    _fill_pixels(ds, stored)
    if ct:
        # CT Image (C.8.2.1)
        ds.RescaleIntercept = _ds([CT_RESCALE_INTERCEPT])[0]
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.KVP = "120"
        ds.ConvolutionKernel = "STANDARD"
        ds.WindowCenter, ds.WindowWidth = "40", "400"
        ds.WindowCenterWidthExplanation = "ABDOMEN"
    else:
        # MR Image (C.8.3.1): a 2D FLAIR (inversion recovery spin echo).
        ds.ScanningSequence = ["SE", "IR"]
        ds.SequenceVariant = ["SK", "SP", "MP"]
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.SequenceName = "FLAIR"
        ds.RepetitionTime = "9000"
        ds.EchoTime = "120"
        ds.InversionTime = "2500"
        ds.EchoTrainLength = 16
        ds.MagneticFieldStrength = "1.5"
        ds.ImagingFrequency = "63.87"
        ds.ImagedNucleus = "1H"
        ds.SpacingBetweenSlices = _ds([grid.spacing[0]])[0]
        ds.WindowCenter, ds.WindowWidth = "700", "1400"
    ds.SOPInstanceUID = generate_uid()
    return ds


_ALGORITHM = hd.AlgorithmIdentificationSequence(
    name="pacsai phantom ground truth",
    family=codes.DCM.Phantom,
    version=pacsai.__version__,
    source="pacsai",
)


def _segment_codes(kind: str) -> list[tuple[int, str, hd.sr.CodedConcept, hd.sr.CodedConcept]]:
    anatomical = codes.cid7150.AnatomicalStructure
    if kind == "ct":
        return [
            (1, "Liver", anatomical, codes.SCT.Liver),
            (2, "Spleen", anatomical, codes.SCT.Spleen),
            (3, "Kidney", anatomical, codes.SCT.Kidney),
        ]
    return [(1, "Lesion", codes.cid7150.MorphologicallyAbnormalStructure, codes.SCT.Lesion)]


def _segmentation(
    kind: str,
    source_images: list[Dataset],
    labels: npt.NDArray[np.uint8],
    series_number: int,
) -> hd.seg.Segmentation:
    """The ground truth as a BINARY Segmentation IOD (PS3.3 A.51), one segment per label."""
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=label,
            segmented_property_category=category,
            segmented_property_type=property_type,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=_ALGORITHM,
            tracking_uid=generate_uid(),
            tracking_id=f"phantom {label.lower()}",
        )
        for number, label, category, property_type in _segment_codes(kind)
    ]
    return hd.seg.Segmentation(
        source_images=source_images,
        pixel_array=labels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=generate_uid(),
        series_number=series_number,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="pacsai phantom",
        manufacturer_model_name="pacsai",
        software_versions=pacsai.__version__,
        device_serial_number="0",
        content_label="TRUTH",
        content_description="Ground truth of the pacsai phantom",
        series_description="PHANTOM GROUND TRUTH",
    )


# --- CR -----------------------------------------------------------------------------------------


def _write_cr(outdir: Path, header: _Header, seed: int, noise: bool) -> PhantomStudy:
    radiograph = ChestRadiograph(seed)
    image = radiograph.render(
        rows=CR_SIZE, columns=CR_SIZE, pixel_spacing=CR_SPACING_MM, noise=noise
    )
    series_dir, truth_dir = outdir / "CR_PA", outdir / "CR_PA_TRUTH"
    _prepare(series_dir)
    _prepare(truth_dir)
    series_uid = generate_uid()
    ds = _new_dataset(ComputedRadiographyImageStorage, series_uid, "CR")
    header.fill(ds)
    _fill_series_and_equipment(
        ds, header, series_number=1, description="CHEST PA PHANTOM", body_part="CHEST"
    )
    # CR Series (C.8.1.1), General Image (C.7.6.1), CR Image (C.8.1.2)
    ds.ViewPosition = "PA"
    ds.InstanceNumber = 1
    ds.PatientOrientation = ["L", "F"]  # PA: the image right is the patient's left
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.ImagerPixelSpacing = _ds([CR_SPACING_MM, CR_SPACING_MM])
    ds.KVP = "120"
    ds.DistanceSourceToDetector = "1800"
    _fill_pixels(ds, _to_stored(image))
    ds.WindowCenter, ds.WindowWidth = "2048", "4096"
    ds.SOPInstanceUID = generate_uid()
    path = series_dir / "IMG0001.dcm"
    _save(ds, path)
    truth_path = truth_dir / "truth.json"
    truth_path.write_text(json.dumps(radiograph.findings.as_dict(), indent=2) + "\n")
    return PhantomStudy(
        kind="cr",
        study_instance_uid=header.study_instance_uid,
        series_instance_uid=series_uid,
        paths=(path,),
        truth_path=truth_path,
        labels=None,
        findings=radiograph.findings,
        grid=None,
    )
