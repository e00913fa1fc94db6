"""What each output channel of a model means, in codes the DICOM outputs can carry.

A segmentation label needs a segmented property category and type (PS3.3 C.8.20.4, CID 7150 and
CID 7151, SNOMED CT), a recommended display colour, and optionally an anatomic region; a
classification class needs the finding it stands for. pacsai reads these, in this order:

1. a ``pacsai.yaml`` beside the bundle's ``configs/metadata.json`` (``configs/pacsai.yaml``),
2. a ``"pacsai"`` object in ``metadata.json`` with the same content,
3. the built-in table below, looked up by the channel's name in ``channel_def``.

The file (or object) looks like this; every key is optional except the codes of a label that the
built-in table does not know::

    modality: [CT]
    labels:
      liver:
        category: {value: "91723000", scheme: SCT, meaning: Anatomical Structure}
        type: {value: "10200004", scheme: SCT, meaning: Liver}
        color: [221, 130, 101]
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.sr.codedict import codes

__all__ = [
    "BUILTIN_LABELS",
    "Code",
    "LabelSemantics",
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
        The channel index (the label value in a label map, or the class index).
    name:
        The name in the bundle's ``channel_def``.
    category, type:
        Segmented Property Category and Type (CID 7150 / CID 7151), or for a classification
        class the finding's category and the finding itself.
    color:
        Recommended display colour as RGB 0..255.
    """

    value: int
    name: str
    category: Code
    type: Code
    color: tuple[int, int, int]


def _sct(keyword: str) -> Code:
    code = getattr(codes.SCT, keyword)
    return Code(code.value, code.scheme_designator, code.meaning)


_ANATOMY = _sct("AnatomicalStructure")
_ABNORMAL = _sct("MorphologicallyAbnormalStructure")

# name -> (category, type, colour); colours follow the 3D Slicer / TotalSegmentator conventions
# where they have one.
BUILTIN_LABELS: dict[str, tuple[Code, Code, tuple[int, int, int]]] = {
    "liver": (_ANATOMY, _sct("Liver"), (221, 130, 101)),
    "spleen": (_ANATOMY, _sct("Spleen"), (157, 108, 162)),
    "kidney": (_ANATOMY, _sct("Kidney"), (185, 102, 83)),
    "pancreas": (_ANATOMY, _sct("Pancreas"), (249, 180, 111)),
    "stomach": (_ANATOMY, _sct("Stomach"), (216, 132, 105)),
    "gallbladder": (_ANATOMY, _sct("Gallbladder"), (139, 150, 98)),
    "aorta": (_ANATOMY, _sct("Aorta"), (224, 97, 76)),
    "esophagus": (_ANATOMY, _sct("Esophagus"), (211, 171, 143)),
    "duodenum": (_ANATOMY, _sct("Duodenum"), (255, 253, 229)),
    "colon": (_ANATOMY, _sct("Colon"), (204, 168, 143)),
    "small_intestine": (_ANATOMY, _sct("SmallIntestine"), (205, 167, 142)),
    "urinary_bladder": (_ANATOMY, _sct("Bladder"), (222, 154, 132)),
    "bladder": (_ANATOMY, _sct("Bladder"), (222, 154, 132)),
    "prostate": (_ANATOMY, _sct("Prostate"), (230, 158, 140)),
    "heart": (_ANATOMY, _sct("Heart"), (206, 110, 84)),
    "lung": (_ANATOMY, _sct("Lung"), (197, 165, 145)),
    "trachea": (_ANATOMY, _sct("Trachea"), (182, 228, 255)),
    "brain": (_ANATOMY, _sct("Brain"), (250, 250, 225)),
    "spinal_cord": (_ANATOMY, _sct("SpinalCord"), (244, 214, 49)),
    "vertebra": (_ANATOMY, _sct("Vertebra"), (241, 214, 145)),
    "bone": (_ANATOMY, _sct("Bone"), (241, 214, 145)),
    "lesion": (_ABNORMAL, _sct("Lesion"), (255, 80, 80)),
    "tumor": (_ABNORMAL, _sct("Tumor"), (255, 80, 80)),
    "mass": (_ABNORMAL, _sct("Mass"), (255, 80, 80)),
    "nodule": (_ABNORMAL, _sct("Nodule"), (255, 170, 0)),
    "hemorrhage": (_ABNORMAL, _sct("Hemorrhage"), (200, 0, 0)),
    "edema": (_ABNORMAL, _sct("Edema"), (110, 180, 255)),
    "pleural_effusion": (_ABNORMAL, _sct("PleuralEffusion"), (80, 160, 255)),
    "effusion": (_ABNORMAL, _sct("PleuralEffusion"), (80, 160, 255)),
    "pneumothorax": (_ABNORMAL, _sct("Pneumothorax"), (120, 255, 120)),
    "cardiomegaly": (_ABNORMAL, _sct("Cardiomegaly"), (255, 120, 200)),
}


def normalise_name(name: str) -> str:
    """``"Small Intestine"``, ``"small-intestine"`` -> ``"small_intestine"``."""
    return re.sub(r"[\s\-]+", "_", name.strip().lower())


def semantics_for(value: int, name: str, override: Any) -> LabelSemantics:
    """The semantics of channel ``value`` named ``name``.

    ``override`` is that label's entry of a ``pacsai.yaml`` (or ``None``); its keys win over the
    built-in table. ``ValueError`` says what is missing when neither knows the label.
    """
    builtin = BUILTIN_LABELS.get(normalise_name(name))
    entry = override if isinstance(override, dict) else {}
    where = f"label {name!r}"
    if "category" in entry:
        category = Code.from_mapping(entry["category"], f"{where}: category")
    elif builtin:
        category = builtin[0]
    else:
        raise ValueError(f"{where} has no coded meaning: add category and type to pacsai.yaml")
    if "type" in entry:
        type_ = Code.from_mapping(entry["type"], f"{where}: type")
    elif builtin:
        type_ = builtin[1]
    else:
        raise ValueError(f"{where} has no coded type: add type to pacsai.yaml")
    color = entry.get("color", builtin[2] if builtin else _palette(value))
    if not (
        isinstance(color, list | tuple)
        and len(color) == 3
        and all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in color)
    ):
        raise ValueError(f"{where}: color must be three integers 0..255")
    return LabelSemantics(value, name, category, type_, (color[0], color[1], color[2]))


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
