"""PNG previews of a DICOM Segmentation over the source slices it was derived from.

Written with the standard library (``zlib`` and ``struct``) from NumPy RGB arrays: no imaging
library is needed. Each preview shows a source slice as the viewer would window it, and beside it
the same slice with every segment blended in its bundle colour and outlined.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from pacsai.reporting.overlay import contour_mask

__all__ = ["encode_png", "render_segmentation", "write_png", "write_segmentation_previews"]

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_FALLBACK_COLORS = ((255, 80, 80), (80, 200, 255), (255, 200, 0), (120, 255, 120), (255, 120, 255))
_ALPHA = 0.5
_MIN_SIDE = 320  # previews of small images are enlarged (nearest neighbour) to at least this

Rgb = npt.NDArray[np.uint8]


def encode_png(rgb: Rgb) -> bytes:
    """Encode an ``(rows, columns, 3)`` uint8 array as an 8-bit RGB PNG (PNG spec, ISO 15948).

    Raises
    ------
    ValueError
        If ``rgb`` is not a non-empty ``(rows, columns, 3)`` uint8 array.
    """
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3 or 0 in rgb.shape:
        raise ValueError(
            f"need a (rows, columns, 3) uint8 array, got {rgb.dtype} {tuple(rgb.shape)}"
        )
    rows, columns = int(rgb.shape[0]), int(rgb.shape[1])
    # Each scanline starts with its filter type byte (0: none).
    scanlines = np.concatenate(
        [np.zeros((rows, 1), np.uint8), np.ascontiguousarray(rgb).reshape(rows, columns * 3)],
        axis=1,
    )

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", columns, rows, 8, 2, 0, 0, 0)
    return (
        _PNG_SIGNATURE
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(scanlines.tobytes(), 6))
        + chunk(b"IEND", b"")
    )


def write_png(path: Path, rgb: Rgb) -> Path:
    """Write ``rgb`` (see :func:`encode_png`) to ``path``; its parent folder is created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png(rgb))
    return path


def _windowed(ds: Dataset) -> npt.NDArray[np.float64]:
    """The source slice as display values 0..1: rescaled, then windowed by the instance's own
    Window Center/Width, or by its 1st to 99th percentile when it has none."""
    pixels = np.asarray(ds.pixel_array, dtype=np.float64)
    if pixels.ndim != 2:
        raise ValueError("only single-frame, single-sample source images can be previewed")
    pixels = pixels * float(ds.get("RescaleSlope", 1) or 1) + float(
        ds.get("RescaleIntercept", 0) or 0
    )
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is not None and width is not None:
        center = float(center[0] if isinstance(center, Sequence) else center)
        width = max(float(width[0] if isinstance(width, Sequence) else width), 1.0)
        low, high = center - width / 2, center + width / 2
    else:
        low, high = (float(v) for v in np.percentile(pixels, [1, 99]))
    gray = np.clip((pixels - low) / max(high - low, 1e-6), 0.0, 1.0)
    if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        gray = 1.0 - gray
    return gray


def render_segmentation(
    source: Dataset, masks: Sequence[tuple[npt.NDArray[np.bool_], tuple[int, int, int]]]
) -> Rgb:
    """The source slice (left) and the slice with each ``(mask, colour)`` blended in and
    outlined (right), side by side, enlarged when small."""
    gray = _windowed(source)
    base = np.repeat(gray[..., None], 3, axis=2) * 255.0
    overlay = base.copy()
    for mask, color in masks:
        if mask.shape != gray.shape:
            raise ValueError(f"a segment frame is {mask.shape}, its source image {gray.shape}")
        rgb = np.asarray(color, dtype=np.float64)
        overlay[mask] = (1 - _ALPHA) * overlay[mask] + _ALPHA * rgb
        overlay[contour_mask(mask.astype(np.uint8))] = rgb
    gap = np.full((gray.shape[0], 4, 3), 255.0)
    image = np.concatenate([base, gap, overlay], axis=1)
    scale = max(1, -(-_MIN_SIDE // max(1, min(gray.shape))))
    if scale > 1:
        image = np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)
    result: Rgb = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return result


def _segment_colors(
    segmentation: Dataset, colors: Mapping[str, tuple[int, int, int]]
) -> dict[int, tuple[int, int, int]]:
    found: dict[int, tuple[int, int, int]] = {}
    for index, item in enumerate(segmentation.get("SegmentSequence", [])):
        label = str(item.get("SegmentLabel", ""))
        fallback = _FALLBACK_COLORS[index % len(_FALLBACK_COLORS)]
        found[int(item.SegmentNumber)] = colors.get(label, fallback)
    return found


def _group(frame: Dataset, shared: Dataset, keyword: str) -> Dataset:
    sequence = frame.get(keyword) or shared.get(keyword)
    if not sequence:
        raise ValueError(f"the SEG has no {keyword} for a frame")
    item: Dataset = sequence[0]
    return item


def _frame_masks(
    segmentation: Dataset,
) -> dict[str, dict[int, npt.NDArray[np.bool_]]]:
    """Source SOP Instance UID -> segment number -> mask, from the per-frame functional groups
    (Derivation Image and Segment Identification, PS3.3 C.8.20.3)."""
    pixels = np.asarray(segmentation.pixel_array)
    if pixels.ndim == 2:
        pixels = pixels[None]
    labelmap = str(segmentation.get("SegmentationType", "")) == "LABELMAP"
    shared_groups = segmentation.get("SharedFunctionalGroupsSequence") or [Dataset()]
    masks: dict[str, dict[int, npt.NDArray[np.bool_]]] = {}
    for index, item in enumerate(segmentation.PerFrameFunctionalGroupsSequence):
        # A functional group is in the frame's item, or shared by all frames.
        derivation = _group(item, shared_groups[0], "DerivationImageSequence")
        source = derivation.SourceImageSequence[0]
        per_source = masks.setdefault(str(source.ReferencedSOPInstanceUID), {})
        frame = pixels[index]
        if labelmap:
            found = {int(v): frame == v for v in np.unique(frame) if v}
        else:
            identification = _group(item, shared_groups[0], "SegmentIdentificationSequence")
            found = {int(identification.ReferencedSegmentNumber): frame > 0}
        for number, mask in found.items():
            previous = per_source.get(number)
            per_source[number] = mask if previous is None else previous | mask
    return masks


def _pick_slices(
    masks: Mapping[str, Mapping[int, npt.NDArray[np.bool_]]],
    sources: Mapping[str, Dataset],
    count: int,
) -> list[str]:
    """The ``count`` slices with the most segmented pixels, not neighbours of one another: a
    slice closer than an eighth of the segmented range to a chosen one is passed over."""
    order = {uid: index for index, uid in enumerate(sources)}
    labelled = [uid for uid in masks if uid in order]
    pixels = {uid: sum(int(mask.sum()) for mask in masks[uid].values()) for uid in labelled}
    ranked = sorted(labelled, key=lambda uid: -pixels[uid])
    if not ranked:
        return []
    positions = [order[uid] for uid in labelled]
    gap = max(1, (max(positions) - min(positions)) // 8)
    chosen: list[str] = []
    for uid in ranked:
        if all(abs(order[uid] - order[other]) >= gap for other in chosen):
            chosen.append(uid)
        if len(chosen) == count:
            break
    return chosen


def write_segmentation_previews(
    segmentation: Dataset,
    sources: Mapping[str, Dataset],
    outdir: Path,
    *,
    prefix: str,
    colors: Mapping[str, tuple[int, int, int]],
    count: int = 3,
) -> list[Path]:
    """Write PNG previews of the ``count`` source slices with the most segmented pixels (apart
    from one another).

    Parameters
    ----------
    segmentation : pydicom.dataset.Dataset
        A Segmentation (BINARY or LABELMAP) with its pixel data.
    sources : mapping of str to pydicom.dataset.Dataset
        Source images by SOP Instance UID, with pixel data, in slice order.
    outdir : pathlib.Path
        Where the PNG files go (created if missing).
    prefix : str
        File name prefix; files are ``<prefix>-<InstanceNumber or index>.png``.
    colors : mapping of str to (int, int, int)
        RGB colour per segment label (the bundle's label colours).
    count : int
        How many slices to preview at most.

    Returns
    -------
    list of pathlib.Path
        The files written, the slice with most segmented pixels first.
    """
    segment_colors = _segment_colors(segmentation, colors)
    masks = _frame_masks(segmentation)
    written = []
    for rank, uid in enumerate(_pick_slices(masks, sources, count)):
        source = sources[uid]
        image = render_segmentation(
            source,
            [
                (mask, segment_colors.get(number, _FALLBACK_COLORS[0]))
                for number, mask in sorted(masks[uid].items())
            ],
        )
        number = source.get("InstanceNumber")
        name = (
            f"{prefix}-slice{int(number):03d}.png" if number is not None else f"{prefix}-{rank}.png"
        )
        written.append(write_png(outdir / name, image))
    return written
