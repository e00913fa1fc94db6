"""Analytic shapes in patient space and the soft-edged painting of them onto a grid.

Each shape gives an approximate signed distance in mm (negative inside) for any LPS point. The
sign is exact, so a voxel's label (centre inside or not) is exact; the magnitude is close to the
true distance near the surface, which is where it matters: an intensity is blended in with a
logistic of the distance, so that the image is a function of patient-space position alone and
does not depend on the grid it is sampled on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

from pacsai.phantom.grid import Grid

FloatArray = npt.NDArray[np.float64]
Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]

#: Width of the logistic edge, mm: intensity = outside + (inside - outside) / (1 + exp(d / w)).
EDGE_WIDTH_MM = 0.7
#: Beyond this many widths from a surface the blend is exactly 0 or 1 (logistic(8) = 3.4e-4).
_EDGE_CUTOFF = 8.0


class Shape(Protocol):
    """A region of patient space with an approximate signed distance to its surface."""

    @property
    def semi_axes(self) -> FloatArray:
        """The 2 or 3 semi-axes, mm."""
        ...

    def to_local(self) -> FloatArray:
        """The ``(n, 4)`` matrix taking homogeneous LPS points to the ``n`` local coordinates."""
        ...

    def bounds(self, margin: float) -> tuple[FloatArray, FloatArray]:
        """An LPS box holding every point within the ``margin`` of :func:`paint` of the shape."""
        ...


def _distance(local: Sequence[FloatArray], semi_axes: FloatArray) -> FloatArray:
    """Approximate signed distance to an axis-aligned ellipsoid (or ellipse) at the origin.

    ``k0 (k0 - 1) / k1`` with ``k0 = |q / a|`` and ``k1 = |q / a^2|``: exact on the axes and for
    spheres, first-order accurate at the surface, and its sign is exact. Outside, it is never
    less than the lower bound ``(k0 - 1) min(a)``, so any point whose true distance exceeds
    ``D max(a) / min(a)`` has an approximate distance of at least ``D``: that is what lets
    :func:`paint` skip everything outside a bounding box.
    """
    k0 = np.zeros(np.broadcast_shapes(*(c.shape for c in local)))
    k1 = np.zeros_like(k0)
    for component, axis in zip(local, semi_axes, strict=True):
        scaled = component / axis
        k0 += scaled * scaled
        scaled /= axis
        k1 += scaled * scaled
    np.sqrt(k0, out=k0)
    np.sqrt(k1, out=k1)
    shortest = float(np.min(semi_axes))
    np.maximum(k1, 1e-12, out=k1)  # only the centre itself has k1 = 0
    distance = k0 - 1.0
    lower = distance * shortest
    distance *= k0
    distance /= k1
    raise_to_bound = (k0 >= 1.0) & (lower > distance)  # outside points only
    distance[raise_to_bound] = lower[raise_to_bound]
    return distance


def _components(matrix: FloatArray, points: FloatArray) -> list[FloatArray]:
    return [points @ row[:3] + row[3] for row in matrix]


@dataclass(frozen=True)
class Ellipsoid:
    """An ellipsoid: ``center`` (LPS mm), ``semi_axes`` (mm) along the columns of ``rotation``."""

    center: FloatArray
    semi_axes: FloatArray
    rotation: FloatArray = field(default_factory=lambda: np.eye(3))

    def to_local(self) -> FloatArray:
        matrix = np.zeros((3, 4))
        matrix[:, :3] = self.rotation.T
        matrix[:, 3] = -self.rotation.T @ self.center
        return matrix

    def signed_distance(self, points: FloatArray) -> FloatArray:
        """Approximate signed distance in mm (negative inside) of LPS ``points`` ``(..., 3)``."""
        return _distance(_components(self.to_local(), points), self.semi_axes)

    def contains(self, points: FloatArray, *, margin: float = 0.0) -> npt.NDArray[np.bool_]:
        """Whether ``points`` lie inside the ellipsoid with ``margin`` mm added to its semi-axes."""
        total = np.zeros(points.shape[:-1])
        for component, axis in zip(
            _components(self.to_local(), points), self.semi_axes + margin, strict=True
        ):
            total += (component / axis) ** 2
        return total < 1.0

    def surface_points(self, count: int = 1200) -> FloatArray:
        """Quasi-uniform points on the surface (a Fibonacci lattice), shape ``(count, 3)``."""
        n = np.arange(count, dtype=np.float64) + 0.5
        polar = np.arccos(1.0 - 2.0 * n / count)
        azimuth = np.pi * (1.0 + 5.0**0.5) * n
        unit = np.stack(
            [np.cos(azimuth) * np.sin(polar), np.sin(azimuth) * np.sin(polar), np.cos(polar)],
            axis=-1,
        )
        return self.center + (unit * self.semi_axes) @ self.rotation.T

    def bounds(self, margin: float) -> tuple[FloatArray, FloatArray]:
        reach = margin * float(np.max(self.semi_axes) / np.min(self.semi_axes))
        half = np.sqrt(((self.rotation * self.semi_axes) ** 2).sum(axis=1)) + reach
        return self.center - half, self.center + half

    def volume_ml(self) -> float:
        """The exact volume in millilitres."""
        return float(4.0 / 3.0 * np.pi * np.prod(self.semi_axes) / 1000.0)


@dataclass(frozen=True)
class EllipticCylinder:
    """An elliptic cylinder of infinite length along z; ``angle`` rotates it about z (radians)."""

    center: FloatArray  # (x, y)
    semi_axes: FloatArray  # (a_x, a_y) before rotation
    angle: float = 0.0

    def to_local(self) -> FloatArray:
        c, s = np.cos(self.angle), np.sin(self.angle)
        rotation = np.array([[c, s], [-s, c]])
        matrix = np.zeros((2, 4))
        matrix[:, :2] = rotation
        matrix[:, 3] = -rotation @ self.center
        return matrix

    def signed_distance(self, points: FloatArray) -> FloatArray:
        """Approximate signed distance in mm (negative inside) of LPS ``points`` ``(..., 3)``."""
        return _distance(_components(self.to_local(), points), self.semi_axes)

    def contains(self, points: FloatArray, *, margin: float = 0.0) -> npt.NDArray[np.bool_]:
        """Whether ``points`` lie inside the cylinder with ``margin`` mm added to its semi-axes."""
        total = np.zeros(points.shape[:-1])
        for component, axis in zip(
            _components(self.to_local(), points), self.semi_axes + margin, strict=True
        ):
            total += (component / axis) ** 2
        return total < 1.0

    def bounds(self, margin: float) -> tuple[FloatArray, FloatArray]:
        c, s = np.cos(self.angle), np.sin(self.angle)
        rotation = np.array([[c, -s], [s, c]])
        reach = margin * float(np.max(self.semi_axes) / np.min(self.semi_axes))
        half = np.sqrt(((rotation * self.semi_axes) ** 2).sum(axis=1)) + reach
        lower = np.array([self.center[0] - half[0], self.center[1] - half[1], -np.inf])
        upper = np.array([self.center[0] + half[0], self.center[1] + half[1], np.inf])
        return lower, upper


def ellipse_distance(
    u: FloatArray,
    v: FloatArray,
    center: tuple[float, float],
    semi_axes: tuple[float, float],
    angle: float,
) -> FloatArray:
    """Approximate signed distance (mm) to a 2-D ellipse rotated by ``angle`` (radians)."""
    c, s = np.cos(angle), np.sin(angle)
    du, dv = u - center[0], v - center[1]
    return _distance([c * du + s * dv, -s * du + c * dv], np.asarray(semi_axes, dtype=np.float64))


def block_distance(grid: Grid, box: Box, shape: Shape) -> FloatArray:
    """The signed distance to ``shape`` at the voxel centres of an index box of ``grid``.

    The local coordinates are affine in the voxel indices, so each is built by broadcasting
    three 1-D ramps instead of from an array of LPS points.
    """
    matrix = shape.to_local() @ grid.affine()  # (n, 4) acting on (i, j, k, 1)
    (k0, k1), (j0, j1), (i0, i1) = box
    k = np.arange(k0, k1, dtype=np.float64)[:, None, None]
    j = np.arange(j0, j1, dtype=np.float64)[None, :, None]
    i = np.arange(i0, i1, dtype=np.float64)[None, None, :]
    local = [row[3] + row[2] * k + row[1] * j + row[0] * i for row in matrix]
    return _distance(local, shape.semi_axes)


def paint(
    image: npt.NDArray[np.float32],
    labels: npt.NDArray[np.uint8],
    grid: Grid,
    shape: Shape,
    value: float,
    *,
    label: int = 0,
    width: float = EDGE_WIDTH_MM,
) -> None:
    """Blend ``value`` into ``image`` inside ``shape``, with a soft edge, and set its label.

    ``image = image + w (value - image)`` with ``w = 1 / (1 + exp(d / width))`` of the signed
    distance ``d``, exactly 0 beyond ``8 width`` outside and exactly 1 beyond ``8 width`` inside;
    only the voxels in the shape's bounding box are evaluated. Voxels whose centre is inside
    (``d < 0``) get ``label`` when it is not 0 (a later shape wins).
    """
    cutoff = _EDGE_CUTOFF * width
    lower, upper = shape.bounds(cutoff)
    box = grid.index_box(lower, upper)
    if box is None:
        return
    distance = block_distance(grid, box, shape)
    index = tuple(slice(start, stop) for start, stop in box)
    block = image[index]
    block[distance <= -cutoff] = value
    edge = np.abs(distance) < cutoff
    weight = 1.0 / (1.0 + np.exp(distance[edge] / width))
    block[edge] += (weight * (value - block[edge])).astype(np.float32)
    if label:
        labels[index][distance < 0] = label
