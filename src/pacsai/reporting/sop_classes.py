"""SOP Classes of the objects pacsai writes that pydicom 3.0 has no name for yet."""

from __future__ import annotations

from pydicom.uid import UID

__all__ = ["LABEL_MAP_SEGMENTATION_STORAGE"]

#: Label Map Segmentation Storage (PS3.4 B.5, DICOM 2024b, Supplement 243).
LABEL_MAP_SEGMENTATION_STORAGE = UID("1.2.840.10008.5.1.4.1.1.66.7")
