"""Workarounds for highdicom 0.28, each with why it is needed and when it can go.

- :func:`comprehensive_3d_sr`: the SR constructor's cost grows with the content tree several
  times over (see there). Can go when highdicom builds an SR document without copying and
  re-parsing its content.
- :func:`pacsai.reporting.sr` builds TID 1411's Referenced Segment itself, since
  ``ReferencedSegment.from_segmentation`` fails on a LABELMAP SEG, and reads qualitative
  evaluations itself, since ``get_qualitative_evaluations`` also returns the finding category
  and the algorithm family (both noted where they are done).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from highdicom.sr import Comprehensive3DSR
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import Tag

__all__ = ["comprehensive_3d_sr"]

_CONTENT_SEQUENCE = Tag(0x0040, 0xA730)


def comprehensive_3d_sr(*, evidence: Sequence[Dataset], content: Dataset, **kwargs: Any) -> Dataset:
    """The Comprehensive 3D SR document ``Comprehensive3DSR(evidence, content, **kwargs)`` writes,
    built without highdicom's passes over the content tree.

    highdicom's constructor deep-copies the content tree and parses the copy back into content
    item objects (for its ``content`` property), then searches the tree for every IMAGE and
    COMPOSITE reference to check it against ``evidence``: for a 104-group TID 1500 report about
    5 of its 8 CPU seconds on a 2-core machine, all of them pure Python. Here the document is
    built around the root container alone (the header, the root's concept name and template,
    and the evidence sequences, which list every instance of ``evidence`` either way), and then
    given the root's content items as they are.

    Parameters
    ----------
    evidence : sequence of pydicom.dataset.Dataset
        Every instance the content refers to, and only those (not checked here: the caller
        builds the references from these instances).
    content : pydicom.dataset.Dataset
        The root container (``MeasurementReport(...)[0]``), as highdicom's templates built it.
    **kwargs
        ``Comprehensive3DSR``'s other arguments.

    Returns
    -------
    pydicom.dataset.Dataset
        The document, as a plain data set to write (read it back with
        ``Comprehensive3DSR.from_dataset`` to walk its content).
    """
    root = Dataset()
    for element in content:
        if element.tag != _CONTENT_SEQUENCE:
            root.add(element)
    root.ContentSequence = []  # searched for references: none
    document = Comprehensive3DSR(evidence=evidence, content=root, **kwargs)
    plain = Dataset()
    for element in document:
        plain.add(element)
    plain.add(content[_CONTENT_SEQUENCE])
    plain.file_meta = FileMetaDataset(document.file_meta)
    return plain
