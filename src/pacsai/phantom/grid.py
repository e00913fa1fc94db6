"""Voxel grids in the DICOM patient coordinate system (LPS, millimetres).

A :class:`Grid` says where every voxel centre of a stack of parallel, equally spaced slices lies in
patient space, in the terms of the Image Plane Module (PS3.3 C.7.6.2): Image Position (Patient)
(0020,0032) of the first slice, Image Orientation (Patient) (0020,0037), Pixel Spacing (0028,0030)
and the step between slices. The phantoms are defined analytically in patient space and sampled at
these centres, so the same body can be rendered on any grid and the results compared voxel by
voxel in patient space.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

__all__ = ["Grid"]

FloatArray = npt.NDArray[np.float64]

_AXES = np.eye(3)
_ORTHONORMAL_TOLERANCE = 1e-6


def _as_spacing(spacing: float | tuple[float, float, float]) -> tuple[float, float, float]:
    values: tuple[float, ...]
    if isinstance(spacing, int | float):
        values = (float(spacing),) * 3
    else:
        values = tuple(float(s) for s in spacing)
    if len(values) != 3 or not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(
            f"spacing must be one positive number or (slice step, row spacing, column spacing) "
            f"in mm, got {spacing!r}"
        )
    return (values[0], values[1], values[2])


def _as_fov(fov_mm: tuple[float, float, float]) -> FloatArray:
    fov = np.asarray(fov_mm, dtype=np.float64)
    if fov.shape != (3,) or not np.all(np.isfinite(fov)) or np.any(fov <= 0):
        raise ValueError(
            f"fov_mm must be three positive lengths (L-R, A-P, S-I) in mm, got {fov_mm!r}"
        )
    return fov


def _count(length_mm: float, step_mm: float) -> int:
    # 384 mm / 3 mm is 128 voxels; the 1e-9 keeps 128.0000000001 from becoming 129.
    return max(1, math.ceil(length_mm / step_mm - 1e-9))


def rotation_matrix(angles_deg: Sequence[float] | FloatArray) -> FloatArray:
    """The matrix rotating about x, then y, then z (right-handed, angles in degrees)."""
    ax, ay, az = (math.radians(float(a)) for a in angles_deg)
    rx = np.array(
        [[1.0, 0.0, 0.0], [0.0, math.cos(ax), -math.sin(ax)], [0.0, math.sin(ax), math.cos(ax)]]
    )
    ry = np.array(
        [[math.cos(ay), 0.0, math.sin(ay)], [0.0, 1.0, 0.0], [-math.sin(ay), 0.0, math.cos(ay)]]
    )
    rz = np.array(
        [[math.cos(az), -math.sin(az), 0.0], [math.sin(az), math.cos(az), 0.0], [0.0, 0.0, 1.0]]
    )
    rotation: FloatArray = rz @ ry @ rx
    return rotation


def _centred_origin(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    directions: tuple[FloatArray, FloatArray, FloatArray],
) -> FloatArray:
    """The first voxel centre of a grid whose centre is the patient-space origin."""
    slice_direction, column_direction, row_direction = directions
    return -(
        (shape[0] - 1) / 2 * spacing[0] * slice_direction
        + (shape[1] - 1) / 2 * spacing[1] * column_direction
        + (shape[2] - 1) / 2 * spacing[2] * row_direction
    )


@dataclass(frozen=True)
class Grid:
    """A stack of equally spaced parallel slices, located in patient space (LPS, mm).

    Parameters
    ----------
    shape : tuple of int
        ``(slices, rows, columns)``: Rows (0028,0010) and Columns (0028,0011) per slice.
    spacing : tuple of float
        ``(slice step, row spacing, column spacing)`` in mm. The row spacing is the distance
        between the centres of adjacent rows, Pixel Spacing (0028,0030) value 1; the column
        spacing is value 2. The slice step is the distance between adjacent slice planes.
    row_direction : numpy.ndarray
        Unit LPS vector along a row, the direction of increasing column index: Image Orientation
        (Patient) (0020,0037) values 1-3.
    column_direction : numpy.ndarray
        Unit LPS vector down a column, the direction of increasing row index: Image Orientation
        (Patient) values 4-6.
    slice_direction : numpy.ndarray
        Unit LPS vector from slice ``k`` to slice ``k + 1``; plus or minus the normal
        ``cross(row_direction, column_direction)``.
    origin : numpy.ndarray
        LPS position of the centre of voxel (slice 0, row 0, column 0): Image Position (Patient)
        (0020,0032) of the first slice.

    Raises
    ------
    ValueError
        If a size or spacing is not positive, or the directions are not orthonormal.
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    row_direction: FloatArray = field(repr=False)
    column_direction: FloatArray = field(repr=False)
    slice_direction: FloatArray = field(repr=False)
    origin: FloatArray = field(repr=False)

    def __post_init__(self) -> None:
        shape = tuple(int(n) for n in self.shape)
        if len(shape) != 3 or any(n < 1 for n in shape):
            raise ValueError(f"shape must be three positive sizes, got {self.shape!r}")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "spacing", _as_spacing(self.spacing))
        vectors = {}
        for name in ("row_direction", "column_direction", "slice_direction", "origin"):
            value = np.array(getattr(self, name), dtype=np.float64)
            if value.shape != (3,) or not np.all(np.isfinite(value)):
                raise ValueError(f"{name} must be three finite numbers, got {value!r}")
            value.setflags(write=False)
            object.__setattr__(self, name, value)
            vectors[name] = value
        basis = np.stack(
            [vectors["row_direction"], vectors["column_direction"], vectors["slice_direction"]]
        )
        if not np.allclose(basis @ basis.T, np.eye(3), atol=_ORTHONORMAL_TOLERANCE):
            raise ValueError(
                "row_direction, column_direction and slice_direction must be orthonormal "
                "(no gantry tilt or shear), got "
                f"{basis.tolist()!r}"
            )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Grid):
            return NotImplemented
        return (
            self.shape == other.shape
            and self.spacing == other.spacing
            and all(
                np.array_equal(getattr(self, name), getattr(other, name))
                for name in ("row_direction", "column_direction", "slice_direction", "origin")
            )
        )

    def __hash__(self) -> int:
        return hash(self.key())

    def key(self) -> tuple[object, ...]:
        """A hashable, exact description of the grid (used to seed noise per grid)."""
        return (
            self.shape,
            self.spacing,
            tuple(self.row_direction.tolist()),
            tuple(self.column_direction.tolist()),
            tuple(self.slice_direction.tolist()),
            tuple(self.origin.tolist()),
        )

    # --- geometry -------------------------------------------------------------------------------

    @property
    def normal(self) -> FloatArray:
        """``cross(row_direction, column_direction)``, the normal of the image plane."""
        return np.cross(self.row_direction, self.column_direction)

    def affine(self) -> FloatArray:
        """The 4x4 matrix mapping ``(column i, row j, slice k, 1)`` to ``(x, y, z, 1)`` in LPS.

        Column ``i`` moves along ``row_direction`` by the column spacing, row ``j`` along
        ``column_direction`` by the row spacing (PS3.3 C.7.6.2.1.1), slice ``k`` along
        ``slice_direction`` by the slice step.
        """
        matrix = np.eye(4)
        matrix[:3, 0] = self.row_direction * self.spacing[2]
        matrix[:3, 1] = self.column_direction * self.spacing[1]
        matrix[:3, 2] = self.slice_direction * self.spacing[0]
        matrix[:3, 3] = self.origin
        return matrix

    def slice_position(self, k: int) -> FloatArray:
        """Image Position (Patient) (0020,0032) of slice ``k``: the centre of its first voxel."""
        return self.origin + k * self.spacing[0] * self.slice_direction

    def points(self) -> FloatArray:
        """LPS centres of all voxels, shape ``(slices, rows, columns, 3)``, float64."""
        return self.block_points((0, self.shape[0]), (0, self.shape[1]), (0, self.shape[2]))

    def block_points(
        self,
        slices: tuple[int, int],
        rows: tuple[int, int],
        columns: tuple[int, int],
    ) -> FloatArray:
        """LPS centres of the voxels in a box of index ranges ``[start, stop)``.

        Returns
        -------
        numpy.ndarray
            Shape ``(stop - start for slices, rows, columns) + (3,)``.
        """
        k = np.arange(*slices, dtype=np.float64)[:, None, None, None]
        j = np.arange(*rows, dtype=np.float64)[None, :, None, None]
        i = np.arange(*columns, dtype=np.float64)[None, None, :, None]
        step_k = self.slice_direction * self.spacing[0]
        step_j = self.column_direction * self.spacing[1]
        step_i = self.row_direction * self.spacing[2]
        return self.origin + k * step_k + j * step_j + i * step_i

    def index_box(
        self, lower: FloatArray, upper: FloatArray
    ) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]] | None:
        """The smallest index box holding every voxel centre inside an LPS box.

        Parameters
        ----------
        lower, upper : numpy.ndarray
            Corners of an axis-aligned box in LPS; components may be infinite.

        Returns
        -------
        tuple or None
            ``((k0, k1), (j0, j1), (i0, i1))`` half-open index ranges (a superset of the voxels
            in the box), or None if no voxel centre can be inside it.
        """
        half = 0.5 * np.abs(self.affine()[:3, :3]).sum(axis=1)
        corners = self._corner_points()
        grid_lower = corners.min(axis=0) - half
        grid_upper = corners.max(axis=0) + half
        lower = np.maximum(np.asarray(lower, dtype=np.float64), grid_lower)
        upper = np.minimum(np.asarray(upper, dtype=np.float64), grid_upper)
        if np.any(lower > upper):
            return None
        box = np.array(
            [
                [x, y, z]
                for x in (lower[0], upper[0])
                for y in (lower[1], upper[1])
                for z in (lower[2], upper[2])
            ]
        )
        index = self.continuous_index(box)  # (8, 3) as (k, j, i)
        low = np.floor(index.min(axis=0)).astype(int)
        high = np.ceil(index.max(axis=0)).astype(int) + 1
        low = np.clip(low, 0, self.shape)
        high = np.clip(high, 0, self.shape)
        if np.any(high <= low):
            return None
        return (
            (int(low[0]), int(high[0])),
            (int(low[1]), int(high[1])),
            (int(low[2]), int(high[2])),
        )

    def continuous_index(self, points: npt.ArrayLike) -> FloatArray:
        """Fractional ``(slice, row, column)`` indices of LPS points (the inverse affine).

        Parameters
        ----------
        points : array_like
            Shape ``(..., 3)`` LPS coordinates in mm.

        Returns
        -------
        numpy.ndarray
            Shape ``(..., 3)``: ``(k, j, i)``; integers fall on voxel centres.
        """
        offset = np.asarray(points, dtype=np.float64) - self.origin
        basis = np.stack([self.slice_direction, self.column_direction, self.row_direction])
        return (offset @ basis.T) / np.asarray(self.spacing)  # type: ignore[no-any-return]

    def _corner_points(self) -> FloatArray:
        last = np.array(self.shape) - 1
        corners = [(k, j, i) for k in (0, last[0]) for j in (0, last[1]) for i in (0, last[2])]
        steps = np.stack(
            [
                self.slice_direction * self.spacing[0],
                self.column_direction * self.spacing[1],
                self.row_direction * self.spacing[2],
            ]
        )
        return self.origin + np.array(corners, dtype=np.float64) @ steps

    # --- constructors ---------------------------------------------------------------------------

    @classmethod
    def axial(
        cls,
        fov_mm: tuple[float, float, float],
        spacing: float | tuple[float, float, float],
        *,
        reverse: bool = False,
    ) -> Grid:
        """An axial grid centred on the patient-space origin.

        Image Orientation (Patient) is ``1\\0\\0\\0\\1\\0``: rows run from anterior to posterior,
        columns from patient right to patient left (the standard axial display).

        Parameters
        ----------
        fov_mm : tuple of float
            Extent (L-R, A-P, S-I) in mm; the voxel counts are ``ceil(fov / spacing)``.
        spacing : float or tuple of float
            Isotropic spacing, or ``(slice step, row spacing, column spacing)`` in mm.
        reverse : bool
            Slices run from superior to inferior instead of inferior to superior.
        """
        fov = _as_fov(fov_mm)
        step = _as_spacing(spacing)
        shape = (_count(fov[2], step[0]), _count(fov[1], step[1]), _count(fov[0], step[2]))
        slice_direction = -_AXES[2] if reverse else _AXES[2]
        directions = (slice_direction, _AXES[1], _AXES[0])
        return cls(
            shape=shape,
            spacing=step,
            row_direction=_AXES[0],
            column_direction=_AXES[1],
            slice_direction=slice_direction,
            origin=_centred_origin(shape, step, directions),
        )

    @classmethod
    def sagittal(
        cls, fov_mm: tuple[float, float, float], spacing: float | tuple[float, float, float]
    ) -> Grid:
        """A sagittal grid centred on the origin, covering the same (L-R, A-P, S-I) box.

        Image Orientation (Patient) is ``0\\1\\0\\0\\0\\-1``: columns run from anterior to
        posterior, rows from superior to inferior; slices step from patient right to left (+x,
        the negative of the normal).
        """
        fov = _as_fov(fov_mm)
        step = _as_spacing(spacing)
        shape = (_count(fov[0], step[0]), _count(fov[2], step[1]), _count(fov[1], step[2]))
        directions = (_AXES[0], -_AXES[2], _AXES[1])
        return cls(
            shape=shape,
            spacing=step,
            row_direction=_AXES[1],
            column_direction=-_AXES[2],
            slice_direction=_AXES[0],
            origin=_centred_origin(shape, step, directions),
        )

    @classmethod
    def coronal(
        cls, fov_mm: tuple[float, float, float], spacing: float | tuple[float, float, float]
    ) -> Grid:
        """A coronal grid centred on the origin, covering the same (L-R, A-P, S-I) box.

        Image Orientation (Patient) is ``1\\0\\0\\0\\0\\-1``: columns run from patient right to
        left, rows from superior to inferior; slices step from anterior to posterior (+y, the
        normal).
        """
        fov = _as_fov(fov_mm)
        step = _as_spacing(spacing)
        shape = (_count(fov[1], step[0]), _count(fov[2], step[1]), _count(fov[0], step[2]))
        directions = (_AXES[1], -_AXES[2], _AXES[0])
        return cls(
            shape=shape,
            spacing=step,
            row_direction=_AXES[0],
            column_direction=-_AXES[2],
            slice_direction=_AXES[1],
            origin=_centred_origin(shape, step, directions),
        )

    @classmethod
    def oblique(
        cls,
        fov_mm: tuple[float, float, float],
        spacing: float | tuple[float, float, float],
        *,
        angles_deg: tuple[float, float, float],
    ) -> Grid:
        """An axial grid rotated about x, then y, then z, centred on the origin.

        The rotated grid's field of view is enlarged so that it covers the whole axis-aligned
        (L-R, A-P, S-I) box ``fov_mm``: along each rotated axis ``u`` its extent is
        ``sum(|u| * fov_mm)``, the length of the box's projection on ``u``. It therefore has more
        voxels than the axial grid with the same ``fov_mm``.

        Parameters
        ----------
        fov_mm : tuple of float
            The (L-R, A-P, S-I) box to cover, in mm.
        spacing : float or tuple of float
            Isotropic spacing, or ``(slice step, row spacing, column spacing)`` in mm.
        angles_deg : tuple of float
            Rotation angles about the x, y and z axes, in degrees (applied in that order).
        """
        fov = _as_fov(fov_mm)
        step = _as_spacing(spacing)
        rotation = rotation_matrix(angles_deg)
        row_direction = rotation @ _AXES[0]
        column_direction = rotation @ _AXES[1]
        slice_direction = rotation @ _AXES[2]
        extent = [
            float(np.abs(u) @ fov) for u in (slice_direction, column_direction, row_direction)
        ]
        shape = (
            _count(extent[0], step[0]),
            _count(extent[1], step[1]),
            _count(extent[2], step[2]),
        )
        directions = (slice_direction, column_direction, row_direction)
        return cls(
            shape=shape,
            spacing=step,
            row_direction=row_direction,
            column_direction=column_direction,
            slice_direction=slice_direction,
            origin=_centred_origin(shape, step, directions),
        )
