"""Synthetic, seeded, reproducible studies: a CT abdomen, an MR brain and a PA chest radiograph.

They train the demo models, feed the tests, and let users check an installation end to end
(``pacsai phantom ct|mr|cr OUTDIR --seed N``). The 3D anatomy is defined analytically in the DICOM
patient coordinate system (LPS, mm), so one phantom can be rendered on any voxel grid (axial,
reversed, sagittal, coronal, oblique) and the renders agree in patient space; the ground truth is
written beside the images as a DICOM SEG (CT, MR) or a JSON file (CR).

>>> from pacsai.phantom import CTAbdomen, Grid
>>> hu, labels = CTAbdomen(seed=3).render(Grid.axial((384, 384, 192), 3.0))
>>> hu.shape, sorted(set(labels.ravel().tolist()))
((64, 128, 128), [0, 1, 2, 3])
"""

from __future__ import annotations

from pacsai.phantom.anatomy import CTAbdomen, MRBrain
from pacsai.phantom.chest import ChestFindings, ChestRadiograph
from pacsai.phantom.dicom import (
    KINDS,
    OBLIQUE_ANGLES_DEG,
    ORIENTATIONS,
    PhantomStudy,
    default_grid,
    write_phantom,
)
from pacsai.phantom.grid import Grid

__all__ = [
    "KINDS",
    "OBLIQUE_ANGLES_DEG",
    "ORIENTATIONS",
    "CTAbdomen",
    "ChestFindings",
    "ChestRadiograph",
    "Grid",
    "MRBrain",
    "PhantomStudy",
    "default_grid",
    "write_phantom",
]
