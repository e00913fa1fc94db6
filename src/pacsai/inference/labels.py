"""What each output channel of a model means, in codes the DICOM outputs can carry.

A segmentation label needs a segmented property category and type (PS3.3 C.8.20.4, CID 7150 and
CID 7151, SNOMED CT), optionally a laterality modifier, and a recommended display colour; a
classification class needs the finding it stands for. pacsai reads these, in this order:

1. a ``pacsai.yaml`` beside the bundle's ``configs/metadata.json`` (``configs/pacsai.yaml``),
2. a ``"pacsai"`` object in ``metadata.json`` with the same content,
3. the built-in table (``label_codes.csv`` beside this module), looked up by the channel's name.

The built-in table covers the vocabularies of common Model Zoo bundles (TotalSegmentator names as
wholeBody_ct_segmentation uses them, BTCV, BraTS regions, prostate zones, pancreas and tumour,
renal structures, cardiac MR), with SNOMED CT codes from TotalSegmentator's published mapping and
DICOM PS3.16 (the file names the source of each row). Names are matched whatever their case and
separators (``Right Kidney``, ``kidney_right``, ``kidney-right``); a left or right part becomes the
laterality modifier (SCT 7771000 Left, 24028007 Right) of the structure without it. A name the
table does not know, misspelt ones included (BTCV's ``Left Kideny``), stays unknown: its codes
must come from ``pacsai.yaml``, and the message says which known name it resembles.

The file (or object) looks like this; every key is optional except the codes of a label that the
built-in table does not know::

    modality: [CT]
    labels:
      liver:
        category: {value: "91723000", scheme: SCT, meaning: Anatomical Structure}
        type: {value: "10200004", scheme: SCT, meaning: Liver}
        modifier: {value: "24028007", scheme: SCT, meaning: Right}   # optional laterality
        color: [221, 130, 101]
"""

from __future__ import annotations

import csv
import difflib
import io
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np
from pydicom.sr.codedict import codes

__all__ = [
    "BUILTIN_LABELS",
    "Code",
    "LabelSemantics",
    "UnknownLabelError",
    "builtin_semantics",
    "label_voxel_counts",
    "normalise_name",
    "semantics_for",
    "voxel_counts",
]


@dataclass(frozen=True)
class Code:
    """A coded concept: (CodeValue, CodingSchemeDesignator, CodeMeaning)."""

    value: str
    scheme: str
    meaning: str

    @classmethod
    def from_mapping(cls, data: Any, where: str) -> Code:
        """Build a code from ``{value, scheme, meaning}``; ``ValueError`` names ``where``."""
        if not isinstance(data, dict) or not all(
            isinstance(data.get(key), str | int)
            and not isinstance(data.get(key), bool)
            and str(data[key]).strip()
            for key in ("value", "scheme", "meaning")
        ):
            raise ValueError(f"{where} must be a mapping with value, scheme and meaning")
        return cls(str(data["value"]), str(data["scheme"]), str(data["meaning"]))


@dataclass(frozen=True)
class LabelSemantics:
    """The meaning of one output channel.

    Attributes
    ----------
    value:
        The label value in the model's label map (the channel index, unless the bundle's
        postprocessing writes other values, as BraTS bundles do: 1, 2, 4), or the class index.
    name:
        The name in the bundle's ``channel_def`` (or ``label_def``).
    category, type:
        Segmented Property Category and Type (CID 7150 / CID 7151), or for a classification
        class the finding's category and the finding itself.
    color:
        Recommended display colour as RGB 0..255.
    modifier:
        Segmented Property Type Modifier, the laterality (SCT Left / Right), or None.
    channel:
        The output channel the label comes from (``value`` when None).
    """

    value: int
    name: str
    category: Code
    type: Code
    color: tuple[int, int, int]
    modifier: Code | None = None
    channel: int | None = None

    @property
    def output_channel(self) -> int:
        """The network output channel of this label."""
        return self.value if self.channel is None else self.channel


class UnknownLabelError(ValueError):
    """A label has no coded meaning: neither ``pacsai.yaml`` nor the built-in table knows it."""

    def __init__(self, name: str, message: str) -> None:
        self.name = name
        super().__init__(message)


def _sct(keyword: str) -> Code:
    code = getattr(codes.SCT, keyword)
    return Code(code.value, code.scheme_designator, code.meaning)


_CATEGORIES = {
    "A": _sct("AnatomicalStructure"),
    "M": _sct("MorphologicallyAbnormalStructure"),
}
_LATERALITY = {"left": _sct("Left"), "right": _sct("Right")}
_SPELLING = {"tumour": "tumor", "oesophagus": "esophagus", "haemorrhage": "hemorrhage"}
_SPELLING.update({"oedema": "edema", "tumours": "tumors", "colour": "color"})


def _read_table() -> dict[str, tuple[Code, Code, tuple[int, int, int]]]:
    text = resources.files("pacsai.inference").joinpath("label_codes.csv").read_text("utf-8")
    rows = csv.DictReader(
        io.StringIO("".join(line for line in text.splitlines(True) if not line.startswith("#")))
    )
    table: dict[str, tuple[Code, Code, tuple[int, int, int]]] = {}
    for row in rows:
        entry = (
            _CATEGORIES[row["category"]],
            Code(row["type_value"], "SCT", row["type_meaning"]),
            (int(row["red"]), int(row["green"]), int(row["blue"])),
        )
        for name in row["names"].split("|"):
            table[name] = entry
    return table


#: name -> (category, type, colour) of every name and alias of the built-in table.
BUILTIN_LABELS: dict[str, tuple[Code, Code, tuple[int, int, int]]] = _read_table()


def normalise_name(name: str) -> str:
    """``"Small Intestine"``, ``"small-intestine"`` -> ``"small_intestine"``.

    Case, spaces, hyphens, dots and other separators do not matter; British spellings become
    American ones (``tumour`` -> ``tumor``), as SNOMED CT's preferred terms are written.
    """
    words = [w for w in re.split(r"[^0-9a-z]+", name.strip().lower()) if w]
    return "_".join(_SPELLING.get(w, w) for w in words)


def builtin_semantics(name: str) -> tuple[Code, Code, tuple[int, int, int], Code | None] | None:
    """The built-in (category, type, colour, laterality modifier) of ``name``, or None."""
    key = normalise_name(name)
    entry = BUILTIN_LABELS.get(key)
    if entry is not None:
        return (*entry, None)
    words = key.split("_")
    sides = [w for w in words if w in _LATERALITY]
    if len(sides) != 1:
        return None
    rest = "_".join(w for w in words if w not in _LATERALITY)
    entry = BUILTIN_LABELS.get(rest)
    return None if entry is None else (*entry, _LATERALITY[sides[0]])


def _resembles(name: str) -> str:
    key = normalise_name(name)
    words = [w for w in key.split("_") if w not in _LATERALITY]
    candidates = difflib.get_close_matches("_".join(words), list(BUILTIN_LABELS), n=1, cutoff=0.8)
    return (
        f" (it resembles the known name {candidates[0]!r}: is it misspelt?)" if candidates else ""
    )


def semantics_for(
    value: int, name: str, override: Any, *, channel: int | None = None
) -> LabelSemantics:
    """The semantics of channel ``value`` named ``name``.

    ``override`` is that label's entry of a ``pacsai.yaml`` (or ``None``); its keys win over the
    built-in table. :class:`UnknownLabelError` (a ``ValueError``) says what is missing when
    neither knows the label.
    """
    builtin = builtin_semantics(name)
    entry = override if isinstance(override, dict) else {}
    where = f"label {name!r}"
    if "category" in entry:
        category = Code.from_mapping(entry["category"], f"{where}: category")
    elif builtin:
        category = builtin[0]
    else:
        raise UnknownLabelError(
            name,
            f"{where} has no coded meaning{_resembles(name)}: add category and type to "
            "pacsai.yaml (`pacsai models codes BUNDLE` writes a stub)",
        )
    if "type" in entry:
        type_ = Code.from_mapping(entry["type"], f"{where}: type")
    elif builtin:
        type_ = builtin[1]
    else:
        raise UnknownLabelError(name, f"{where} has no coded type: add type to pacsai.yaml")
    if "modifier" in entry:
        modifier = (
            None
            if entry["modifier"] is None
            else Code.from_mapping(entry["modifier"], f"{where}: modifier")
        )
    else:
        modifier = builtin[3] if builtin and "type" not in entry else None
    color = entry.get("color", builtin[2] if builtin else _palette(value))
    if not (
        isinstance(color, list | tuple)
        and len(color) == 3
        and all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in color)
    ):
        raise ValueError(f"{where}: color must be three integers 0..255")
    return LabelSemantics(
        value, name, category, type_, (color[0], color[1], color[2]), modifier, channel
    )


def _palette(value: int) -> tuple[int, int, int]:
    palette = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48)]
    return palette[value % len(palette)]


def voxel_counts(label_map: np.ndarray) -> np.ndarray:
    """Voxels per label value (index = value) of a non-negative integer label map.

    Counted a slice at a time: converting a 300x512x512 map to intp at once costs a 630 MB
    temporary and over a second.
    """
    counts = np.zeros(1, dtype=np.int64)
    for plane in label_map.reshape(label_map.shape[0], -1) if label_map.ndim > 1 else [label_map]:
        plane_counts = np.bincount(plane.astype(np.intp, copy=False), minlength=1)
        if plane_counts.size > counts.size:
            counts = np.pad(counts, (0, plane_counts.size - counts.size))
        counts[: plane_counts.size] += plane_counts
    return counts


def label_voxel_counts(label_map: np.ndarray, labels: Any) -> dict[int, int]:
    """Voxels of each label (by value): of a label map, or of one boolean mask per label.

    ``label_map`` is either integer label values, shape ``(slices, rows, columns)``, or, for a
    multi-label model whose labels may overlap, one mask per label in ``labels`` order, shape
    ``(labels, slices, rows, columns)``.
    """
    labels = list(labels)
    if label_map.ndim == 4:
        return {
            label.value: int(np.count_nonzero(mask))
            for label, mask in zip(labels, label_map, strict=True)
        }
    counts = voxel_counts(label_map)
    return {
        label.value: int(counts[label.value]) if label.value < counts.size else 0
        for label in labels
    }
