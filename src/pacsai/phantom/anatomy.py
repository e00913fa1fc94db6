"""Seeded analytic 3D phantoms: a contrast-enhanced CT abdomen and a FLAIR-like MR brain.

The anatomy is a set of ellipsoids and elliptic cylinders in the DICOM patient coordinate system
(LPS, mm: +x patient left, +y posterior, +z superior), with the patient-space origin at the centre
of the body. Rendering samples it at the voxel centres of a :class:`~pacsai.phantom.grid.Grid`:
intensities are blended across each surface with a logistic of the signed distance (width
0.7 mm), labels are "voxel centre inside", so the same phantom rendered on an axial, reversed,
sagittal, coronal or oblique grid agrees in patient space.

Each seed gives a different, plausible body: sizes vary by up to +-12 %, positions by up to
+-8 mm, orientations by a few degrees, and a draw is rejected (and drawn again, from the same
seeded stream) until no two organs touch.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import numpy.typing as npt

from pacsai.phantom._shapes import Ellipsoid, EllipticCylinder, Shape, paint
from pacsai.phantom.grid import Grid, rotation_matrix

__all__ = ["CTAbdomen", "MRBrain"]

FloatArray = npt.NDArray[np.float64]

_MAX_DRAWS = 200


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _generator(*words: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(w) for w in words]))


def _grid_words(grid: Grid) -> list[int]:
    """Four 32-bit words that identify a grid exactly (its noise differs from any other grid)."""
    digest = hashlib.sha256(repr(grid.key()).encode()).digest()
    return [int.from_bytes(digest[n : n + 4], "little") for n in range(0, 16, 4)]


def _vary(rng: np.random.Generator, values: Sequence[float], fraction: float) -> FloatArray:
    return np.asarray(values, dtype=np.float64) * rng.uniform(
        1 - fraction, 1 + fraction, len(values)
    )


def _jitter(rng: np.random.Generator, values: Sequence[float], mm: float) -> FloatArray:
    return np.asarray(values, dtype=np.float64) + rng.uniform(-mm, mm, len(values))


def _tilt(rng: np.random.Generator, nominal_deg: Sequence[float], spread_deg: float) -> FloatArray:
    angles = np.asarray(nominal_deg, dtype=np.float64)
    return rotation_matrix(angles + rng.uniform(-spread_deg, spread_deg, 3))


def _overlap(a: Ellipsoid, b: Ellipsoid, margin: float) -> bool:
    """Whether ``a`` and ``b`` come within about ``margin`` mm of each other."""
    return bool(
        np.any(b.contains(a.surface_points(), margin=margin))
        or np.any(a.contains(b.surface_points(), margin=margin))
        or b.contains(a.center[None], margin=margin)[0]
        or a.contains(b.center[None], margin=margin)[0]
    )


def _empty(grid: Grid, value: float) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8]]:
    return np.full(grid.shape, value, dtype=np.float32), np.zeros(grid.shape, dtype=np.uint8)


@dataclass(frozen=True)
class Organ:
    """One labelled structure of a phantom: its label value, name, shape and intensity."""

    label: int
    name: str
    shape: Ellipsoid
    value: float


class CTAbdomen:
    """A contrast-enhanced (portal venous phase) CT of the upper abdomen.

    Structures, in painting order (a later one wins where they meet), with nominal sizes
    (full lengths along x, y, z) and centres:

    ============== ============================================== ======== =====
    structure      shape (LPS mm)                                 HU       label
    ============== ============================================== ======== =====
    air            everything outside the body                    -1000    0
    body           elliptic cylinder along z, 320 x 230           -100     0
    soft tissue    the body less a 10-15 mm subcutaneous fat ring 50       0
    vertebral body elliptic cylinder at (0, +55), 40 x 34         700      0
    aorta          cylinder at (+14, +22), diameter 22            160      0
    liver          ellipsoid at (-60, -16, +38), 128 x 124 x 110  100      1
    spleen         ellipsoid at (+85, +25, +58), 56 x 100 x 80    140      2
    right kidney   ellipsoid at (-68, +50, -50), 54 x 44 x 90     200      3
    left kidney    ellipsoid at (+68, +48, -42), 54 x 44 x 90     200      3
    ============== ============================================== ======== =====

    Nominal volumes: liver 910 ml, spleen 235 ml, each kidney 110 ml. The body outline varies
    by +-8 % and the organ positions scale with it; each organ's semi-axes vary by +-12 %, its
    centre by +-8 mm, its orientation by +-8 degrees (the liver, spleen and kidneys are also
    tilted by a fixed 10-25 degrees, the kidneys' upper poles medially). A draw in which two
    organs come within 3 mm of each other, an organ within 3 mm of the spine or the aorta, or
    within 4 mm of the fat ring, is rejected and drawn again from the same stream (about one
    draw in two is kept).

    Parameters
    ----------
    seed : int
        Non-negative; the same seed always gives the same body.
    """

    LABELS: ClassVar[dict[int, str]] = {1: "liver", 2: "spleen", 3: "kidney"}
    #: Standard deviation of the Gaussian noise, HU.
    NOISE_SIGMA: ClassVar[float] = 12.0
    #: Rendered values are clipped to what 12 stored bits with intercept -1024 can hold.
    HU_RANGE: ClassVar[tuple[float, float]] = (-1024.0, 3071.0)
    AIR_HU: ClassVar[float] = -1000.0
    FAT_HU: ClassVar[float] = -100.0
    SOFT_TISSUE_HU: ClassVar[float] = 50.0
    BONE_HU: ClassVar[float] = 700.0
    AORTA_HU: ClassVar[float] = 160.0

    _TAG: ClassVar[int] = 0x43540001  # "CT", keeps the CT streams apart from the MR ones

    def __init__(self, seed: int) -> None:
        self.seed = _check_seed(seed)
        rng = _generator(self.seed, self._TAG)
        for _ in range(_MAX_DRAWS):
            if self._draw(rng):
                return
        raise RuntimeError(  # pragma: no cover - the constraints reject about one draw in five
            f"could not draw a CT abdomen without overlapping organs for seed {seed}"
        )

    def _draw(self, rng: np.random.Generator) -> bool:
        outer_axes = _vary(rng, (160.0, 115.0), 0.08)
        scale = np.array([outer_axes[0] / 160.0, outer_axes[1] / 115.0, 1.0])
        centre = _jitter(rng, (0.0, 0.0), 5.0)
        angle = math.radians(rng.uniform(-3.0, 3.0))
        self.fat_thickness_mm = float(rng.uniform(10.0, 15.0))
        self.body = EllipticCylinder(centre, outer_axes, angle)
        self.soft_tissue = EllipticCylinder(centre, outer_axes - self.fat_thickness_mm, angle)
        spine_centre = centre + _jitter(rng, (0.0, 55.0 * scale[1]), 4.0)
        self.vertebra = EllipticCylinder(spine_centre, _vary(rng, (20.0, 17.0), 0.1), angle)
        aorta_centre = spine_centre + _jitter(rng, (14.0, -33.0), 3.0)
        self.aorta = EllipticCylinder(aorta_centre, _vary(rng, (11.0, 11.0), 0.1), 0.0)

        def organ(
            label: int, name: str, at: Sequence[float], axes: Sequence[float], tilt: Sequence[float]
        ) -> Organ:
            origin = np.array([centre[0], centre[1], 0.0])
            shape = Ellipsoid(
                center=_jitter(rng, origin + np.asarray(at) * scale, 8.0),
                semi_axes=_vary(rng, axes, 0.12),
                rotation=_tilt(rng, tilt, 8.0),
            )
            return Organ(label, name, shape, {1: 100.0, 2: 140.0, 3: 200.0}[label])

        self.organs: tuple[Organ, ...] = (
            organ(1, "liver", (-60.0, -16.0, 38.0), (64.0, 62.0, 55.0), (0.0, 0.0, -10.0)),
            organ(2, "spleen", (85.0, 25.0, 58.0), (28.0, 50.0, 40.0), (20.0, 0.0, 25.0)),
            organ(3, "right kidney", (-68.0, 50.0, -50.0), (27.0, 22.0, 45.0), (0, 10.0, 20.0)),
            organ(3, "left kidney", (68.0, 48.0, -42.0), (27.0, 22.0, 45.0), (0, -10.0, -20.0)),
        )
        return self._plausible()

    def _plausible(self) -> bool:
        for n, first in enumerate(self.organs):
            surface = first.shape.surface_points()
            if not np.all(self.soft_tissue.contains(surface, margin=-4.0)):
                return False
            if np.any(self.vertebra.contains(surface, margin=3.0)) or np.any(
                self.aorta.contains(surface, margin=3.0)
            ):
                return False
            if any(_overlap(first.shape, other.shape, 3.0) for other in self.organs[n + 1 :]):
                return False
        return True

    def render(
        self, grid: Grid, *, noise: bool = True
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8]]:
        """Sample the phantom at the voxel centres of ``grid``.

        Parameters
        ----------
        grid : Grid
            Where to sample.
        noise : bool
            Add Gaussian noise (sigma :attr:`NOISE_SIGMA` HU) from a generator seeded by the
            phantom's seed and the grid, so a render is reproducible; False gives the clean image.

        Returns
        -------
        hu : numpy.ndarray
            float32 ``(slices, rows, columns)`` Hounsfield units, clipped to :attr:`HU_RANGE`.
        labels : numpy.ndarray
            uint8, same shape: 0 background, then :attr:`LABELS`.
        """
        image, labels = _empty(grid, self.AIR_HU)
        structures: list[tuple[Shape, float, int]] = [
            (self.body, self.FAT_HU, 0),
            (self.soft_tissue, self.SOFT_TISSUE_HU, 0),
            (self.vertebra, self.BONE_HU, 0),
            (self.aorta, self.AORTA_HU, 0),
        ]
        structures += [(o.shape, o.value, o.label) for o in self.organs]
        for shape, value, label in structures:
            paint(image, labels, grid, shape, value, label=label)
        if noise:
            rng = _generator(self.seed, self._TAG, *_grid_words(grid))
            image += rng.normal(0.0, self.NOISE_SIGMA, grid.shape).astype(np.float32)
        np.clip(image, *self.HU_RANGE, out=image)
        return image, labels


class MRBrain:
    """A FLAIR-like MR of the head with 1 to 4 bright lesions in the brain.

    ============== ================================================= ====== =====
    structure      shape (LPS mm, semi-axes along x, y, z)           signal label
    ============== ================================================= ====== =====
    air            outside the head                                  0      0
    scalp, skull   head ellipsoid at the origin, 75 x 95 x 85        100    0
    brain          the head less a 7-10 mm shell                     600    0
    ventricles     two ellipsoids 6 x 25 x 10 at (+-9, -5, +10)      250    0
    lesions        1-4 spheres of radius 6-14 mm inside the brain    1100   1
    ============== ================================================= ====== =====

    The head varies by +-8 % per semi-axis, +-3 mm in position and +-5 degrees in orientation;
    the ventricles by +-12 % and +-4 mm, diverging posteriorly by 6-14 degrees. Lesions keep
    3 mm from the brain surface, the ventricles and each other. The whole image is multiplied
    by a smooth bias field between 0.9 and 1.1 (two sinusoids of 250-450 mm wavelength in
    patient space), as a receive coil would.

    Parameters
    ----------
    seed : int
        Non-negative; the same seed always gives the same head.
    """

    LABELS: ClassVar[dict[int, str]] = {1: "lesion"}
    NOISE_SIGMA: ClassVar[float] = 25.0
    SIGNAL_RANGE: ClassVar[tuple[float, float]] = (0.0, 4095.0)
    SCALP_SIGNAL: ClassVar[float] = 100.0
    BRAIN_SIGNAL: ClassVar[float] = 600.0
    CSF_SIGNAL: ClassVar[float] = 250.0
    LESION_SIGNAL: ClassVar[float] = 1100.0

    _TAG: ClassVar[int] = 0x4D520001  # "MR"

    def __init__(self, seed: int) -> None:
        self.seed = _check_seed(seed)
        rng = _generator(self.seed, self._TAG)
        rotation = _tilt(rng, (0.0, 0.0, 0.0), 5.0)
        centre = _jitter(rng, (0.0, 0.0, 0.0), 3.0)
        head_axes = _vary(rng, (75.0, 95.0, 85.0), 0.08)
        self.skull_thickness_mm = float(rng.uniform(7.0, 10.0))
        self.head = Ellipsoid(centre, head_axes, rotation)
        self.brain = Ellipsoid(centre, head_axes - self.skull_thickness_mm, rotation)
        ventricle_axes = _vary(rng, (6.0, 25.0, 10.0), 0.12)
        lateral = float(rng.uniform(7.5, 10.5))
        offset = _jitter(rng, (0.0, -5.0, 10.0), 4.0)
        spread = float(rng.uniform(6.0, 14.0))
        self.ventricles = tuple(
            Ellipsoid(
                centre + rotation @ (offset + np.array([side * lateral, 0.0, 0.0])),
                ventricle_axes,
                rotation @ rotation_matrix((0.0, 0.0, -side * spread)),
            )
            for side in (-1.0, 1.0)
        )
        self.lesions: tuple[Ellipsoid, ...] = self._draw_lesions(rng, int(rng.integers(1, 5)))
        self._bias = [
            (
                _unit(rng) * (2 * math.pi / rng.uniform(250.0, 450.0)),
                float(rng.uniform(0, 2 * math.pi)),
                amplitude,
            )
            for amplitude in (0.06, 0.04)
        ]

    def _draw_lesions(self, rng: np.random.Generator, count: int) -> tuple[Ellipsoid, ...]:
        lesions: list[Ellipsoid] = []
        for _ in range(_MAX_DRAWS * 50):
            radius = float(rng.uniform(6.0, 14.0))
            local = rng.uniform(-1.0, 1.0, 3) * self.brain.semi_axes
            sphere = Ellipsoid(
                self.brain.center + self.brain.rotation @ local, np.full(3, radius), np.eye(3)
            )
            surface = sphere.surface_points(400)
            if np.any(self.brain.signed_distance(surface) > -3.0):
                continue
            if any(_overlap(sphere, v, 3.0) for v in self.ventricles):
                continue
            if any(
                np.linalg.norm(sphere.center - other.center)
                < radius + float(other.semi_axes[0]) + 3.0
                for other in lesions
            ):
                continue
            lesions.append(sphere)
            if len(lesions) == count:
                return tuple(lesions)
        raise RuntimeError(  # pragma: no cover - a brain holds four 14 mm lesions easily
            f"could not place {count} lesions for seed {self.seed}"
        )

    def bias_field(self, points: FloatArray) -> FloatArray:
        """The multiplicative receive-coil inhomogeneity, 0.9-1.1, at LPS ``points`` (..., 3)."""
        field = np.ones(points.shape[:-1])
        for wave, phase, amplitude in self._bias:
            field += amplitude * np.sin(points @ wave + phase)
        return field

    def render(
        self, grid: Grid, *, noise: bool = True
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8]]:
        """Sample the phantom at the voxel centres of ``grid``.

        Parameters
        ----------
        grid : Grid
            Where to sample.
        noise : bool
            Add Gaussian noise (sigma :attr:`NOISE_SIGMA`) from a generator seeded by the
            phantom's seed and the grid, then take the magnitude (as an MR reconstruction does);
            False gives the clean image.

        Returns
        -------
        signal : numpy.ndarray
            float32 ``(slices, rows, columns)``, 0 to about 1500, clipped to
            :attr:`SIGNAL_RANGE`.
        labels : numpy.ndarray
            uint8, same shape: 1 inside a lesion.
        """
        image, labels = _empty(grid, 0.0)
        paint(image, labels, grid, self.head, self.SCALP_SIGNAL)
        paint(image, labels, grid, self.brain, self.BRAIN_SIGNAL)
        for ventricle in self.ventricles:
            paint(image, labels, grid, ventricle, self.CSF_SIGNAL)
        for lesion in self.lesions:
            paint(image, labels, grid, lesion, self.LESION_SIGNAL, label=1)
        box = grid.index_box(*self.head.bounds(10.0))
        if box is not None:
            index = tuple(slice(start, stop) for start, stop in box)
            image[index] *= self.bias_field(grid.block_points(*box)).astype(np.float32)
        if noise:
            rng = _generator(self.seed, self._TAG, *_grid_words(grid))
            image += rng.normal(0.0, self.NOISE_SIGMA, grid.shape).astype(np.float32)
            np.abs(image, out=image)
        np.clip(image, *self.SIGNAL_RANGE, out=image)
        return image, labels


def _unit(rng: np.random.Generator) -> FloatArray:
    vector = rng.normal(size=3)
    return vector / np.linalg.norm(vector)
