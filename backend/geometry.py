"""The voxel grid of a 3D image: :class:`Geometry` (size, spacing, origin, direction; SimpleITK order, LPS).

``direction`` is a row-major 9-tuple (column ``j`` = world direction of index axis ``j``). NIfTI stores
spacing, origin and direction as float32, so geometry made up in float64 comes back from a file as its
nearest float32 value, which :meth:`Geometry.matches` accepts. Re-exported by :mod:`backend.io`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import SimpleITK as sitk

@dataclass(frozen=True)
class Geometry:
    """The voxel grid of a 3D image, in SimpleITK (x, y, z) order and LPS world coordinates.

    ``direction`` is row-major: ``np.reshape(direction, (3, 3))[:, j]`` is the world (LPS) unit
    vector along index axis ``j``; world = origin + D @ (index * spacing).
    """

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    def __post_init__(self):
        object.__setattr__(self, "size", tuple(int(v) for v in self.size))
        object.__setattr__(self, "spacing", tuple(float(v) for v in self.spacing))
        object.__setattr__(self, "origin", tuple(float(v) for v in self.origin))
        object.__setattr__(self, "direction", tuple(float(v) for v in np.ravel(self.direction)))
        if len(self.size) != 3 or len(self.spacing) != 3 or len(self.origin) != 3:
            raise ValueError(f"Geometry must be 3D, got size {self.size}, spacing {self.spacing}, origin {self.origin}")
        if len(self.direction) != 9:
            raise ValueError(f"Geometry.direction must have 9 values, got {len(self.direction)}")
        if min(self.spacing) <= 0:
            raise ValueError(f"Geometry.spacing must be positive, got {self.spacing}")

    # -- conversions -------------------------------------------------------------------------
    @classmethod
    def from_image(cls, image: sitk.Image) -> Geometry:
        return cls(image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        """Set spacing, origin and direction on ``image`` (in place; returned for chaining)."""
        if tuple(image.GetSize()) != self.size:
            raise ValueError(f"image size {image.GetSize()} differs from geometry size {self.size}")
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def to_dict(self) -> dict:
        """JSON-friendly dict (lists of Python numbers)."""
        return {
            "size": list(self.size),
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": list(self.direction),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Geometry:
        return cls(tuple(d["size"]), tuple(d["spacing"]), tuple(d["origin"]), tuple(d["direction"]))

    # -- derived -----------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int]:
        """numpy array shape (z, y, x) of an image on this grid."""
        return self.size[::-1]

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in millilitres (spacing in mm)."""
        return float(np.prod(self.spacing)) / 1000.0

    def matches(self, other: Geometry, *, rtol: float = 1e-6, atol: float = 1e-5) -> bool:
        """True if both describe the same grid up to floating-point noise.

        Sizes must be equal; spacing, origin (mm) and direction cosines are compared with
        ``numpy.allclose(rtol, atol)``, so spacing 0.9999999999999929 matches 1.0 but 1.0 vs 1.01
        (or a flipped axis) does not.
        """
        if self.size != other.size:
            return False
        return (
            np.allclose(self.spacing, other.spacing, rtol=rtol, atol=atol)
            and np.allclose(self.origin, other.origin, rtol=rtol, atol=atol)
            and np.allclose(self.direction, other.direction, rtol=rtol, atol=atol)
        )

    def describe_difference(self, other: Geometry, *, rtol: float = 1e-6, atol: float = 1e-5) -> str:
        """Short text naming the first field that differs ("" if the grids match)."""
        if self.size != other.size:
            return f"size {self.size} vs {other.size}"
        for name in ("spacing", "origin", "direction"):
            a, b = getattr(self, name), getattr(other, name)
            if not np.allclose(a, b, rtol=rtol, atol=atol):
                return f"{name} {_fmt(a)} vs {_fmt(b)}"
        return ""

    def world_to_voxel(self, points) -> np.ndarray:
        """World (LPS, mm) points ``(..., 3)`` -> continuous voxel indices ``(..., 3)`` in (x, y, z) order.

        Index (i, j, k) addresses ``array[k, j, i]``; integer values are voxel centres.
        """
        p = np.asarray(points, dtype=np.float64) - np.asarray(self.origin)
        idx = p @ np.linalg.inv(self.direction_matrix).T
        return idx / np.asarray(self.spacing)

    def voxel_to_world(self, indices) -> np.ndarray:
        """Voxel indices ``(..., 3)`` in (x, y, z) order -> world (LPS, mm) points ``(..., 3)``."""
        idx = np.asarray(indices, dtype=np.float64) * np.asarray(self.spacing)
        return idx @ self.direction_matrix.T + np.asarray(self.origin)


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"
