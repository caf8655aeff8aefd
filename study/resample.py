"""The one preprocessing every case goes through: a resampling onto the study grid that treats every case alike.

The study grid is canonical (LPS, identity direction), has the study's spacing and a fixed size, and
is centred on the tumor (:func:`roi_centre`). Centring it *exactly* on the centroid leaks the class:
with an even grid size the grid centre lies between voxels, so a centroid on a whole voxel (every
symmetric ellipsoid a synthesizer draws) put every grid point half a voxel off the source voxels,
and linear interpolation averaged neighbours and halved that case's noise, while real tumors, whose
centroids fall anywhere, kept most of theirs. So the grid is placed by a rule that ignores where the
centroid falls within its voxel (:func:`grid_origin`):

* along a world axis where the source spacing equals the study spacing, the grid points are the
  source voxel centres: the crop is an integer shift, no voxel is interpolated;
* along any other axis, the grid points sit at one fractional position ``phase`` (in source
  voxels) relative to the source voxel centres, the same for every case of the study. The phase is
  drawn once per study from the operating system's randomness (:func:`draw_phase`) and recorded in
  the key, so no choice of ours favours a class and the study can be rebuilt exactly.

Either way the tumor centroid ends up within half a source voxel of the grid centre. Sources whose
axes are oblique to LPS have no per-axis voxel lattice; they are placed exactly on the centroid (the
interpolation weights then vary over the grid anyway) and the key says so.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import numpy as np

from backend.errors import DiffTumorError

HU_RANGE = (-1024, 3071)  # int16 CT range written for every case
SPACING_RTOL = 1e-3  # source and study spacing closer than this count as equal (integer shift)
AXIS_TOL = 1e-4  # a direction cosine this close to 0 or +-1 counts as axis-aligned


@dataclass(frozen=True)
class Placement:
    """How one case's grid was placed: ``mode`` per world axis (x, y, z) is ``shift`` (source voxels
    copied), ``phase`` (the study's fractional offset) or ``oblique`` (centred exactly)."""

    origin: tuple[float, float, float]
    modes: tuple[str, str, str]


def draw_phase() -> tuple[float, float, float]:
    """The study's fractional offset per world axis, in [0, 1) source voxels, from OS randomness."""
    return tuple(secrets.randbits(32) / 2**32 for _ in range(3))


def roi_centre(volume, mask) -> np.ndarray:
    """World (LPS, x y z) centre: tumor centroid (label 2 if present, else any non-zero) or volume centre."""
    geometry = volume.geometry
    if mask is None:
        return np.asarray(geometry.voxel_to_world((np.asarray(geometry.size) - 1) / 2.0), dtype=float).reshape(3)
    arr = mask.array
    sel = arr == 2 if np.any(arr == 2) else arr != 0
    zyx = np.argwhere(sel)
    if zyx.size == 0:
        raise DiffTumorError(f"{mask.name}: the tumor mask is empty; cannot centre the view")
    xyz = zyx.mean(axis=0)[::-1]
    return np.asarray(mask.geometry.voxel_to_world(xyz), dtype=float).reshape(3)


def world_axis_pitch(geometry) -> list[tuple[int, float] | None]:
    """Per world axis (x, y, z): ``(index axis, voxel pitch in mm)`` when one index axis runs along it
    (a permuted or flipped, not oblique, direction), else ``None``."""
    d = geometry.direction_matrix
    out: list[tuple[int, float] | None] = []
    for w in range(3):
        row = np.abs(d[w])
        j = int(np.argmax(row))
        aligned = abs(row[j] - 1) < AXIS_TOL and np.all(np.delete(row, j) < AXIS_TOL)
        out.append((j, float(geometry.spacing[j])) if aligned else None)
    return out


def grid_origin(geometry, centre, size, spacing, phase) -> Placement:
    """Origin (LPS world, mm) of the study grid for a source on ``geometry``: near ``centre`` minus half the
    grid, placed on the source voxel lattice as the module docstring says (never on the centroid itself)."""
    spacing = np.asarray(spacing, dtype=float)
    wanted = np.asarray(centre, dtype=float) - (np.asarray(size) - 1) / 2.0 * spacing
    lattice = np.asarray(geometry.origin, dtype=float)  # a source voxel centre; the others lie a whole pitch apart
    origin, modes = [], []
    for w, axis in enumerate(world_axis_pitch(geometry)):
        if axis is None:
            origin.append(float(wanted[w]))
            modes.append("oblique")
            continue
        _, pitch = axis
        same = math.isclose(pitch, spacing[w], rel_tol=SPACING_RTOL)
        frac = 0.0 if same else float(phase[w])
        k = math.floor((wanted[w] - lattice[w]) / pitch - frac + 0.5)  # nearest placement; ties go up
        origin.append(float(lattice[w] + (k + frac) * pitch))
        modes.append("shift" if same else "phase")
    return Placement(tuple(origin), tuple(modes))


def preprocess_case(volume, mask, *, size, spacing, phase) -> tuple[np.ndarray, Placement, float]:
    """One case -> (int16 (z, y, x) array on the study grid, its :class:`Placement`, padded fraction).

    The padded fraction is the share of grid voxels outside the source's field of view (filled with
    -1024): those whose continuous source index lies outside [-0.5, n - 0.5), as ITK's interpolator has it.
    """
    import SimpleITK as sitk

    placement = grid_origin(volume.geometry, roi_centre(volume, mask), size, spacing, phase)
    identity = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    image = sitk.Cast(volume.to_sitk(), sitk.sitkFloat32)
    out = sitk.Resample(image, [int(s) for s in size], sitk.Transform(), sitk.sitkLinear, list(placement.origin),
                        [float(s) for s in spacing], identity, float(HU_RANGE[0]), sitk.sitkFloat32)
    arr = np.clip(np.rint(sitk.GetArrayFromImage(out)), *HU_RANGE).astype(np.int16)
    return arr, placement, padded_fraction(volume.geometry, placement.origin, size, spacing)


def padded_fraction(geometry, origin, size, spacing) -> float:
    """Share of the grid (identity direction, ``origin``, ``size``, ``spacing``) outside ``geometry``'s voxels."""
    n = np.asarray(geometry.size, dtype=float)
    to_index = geometry.direction_matrix.T / np.asarray(geometry.spacing)[:, None]  # world offset -> index
    xs, ys = (np.asarray(origin[a]) + np.arange(size[a]) * spacing[a] for a in (0, 1))
    plane = np.stack(np.meshgrid(xs, ys, indexing="xy"), axis=-1).reshape(-1, 2)  # (y*x, 2) world x, y
    outside = 0
    for k in range(int(size[2])):
        z = origin[2] + k * spacing[2]
        points = np.column_stack([plane, np.full(len(plane), z)]) - np.asarray(geometry.origin)
        idx = points @ to_index.T
        outside += int(np.count_nonzero(np.any((idx < -0.5) | (idx >= n - 0.5), axis=1)))
    return outside / float(np.prod(size))


def resample_labels(mask, placement: Placement, *, size, spacing) -> np.ndarray:
    """``mask`` on the study grid (nearest neighbour), for statistics only: never written to the package."""
    import SimpleITK as sitk

    out = sitk.Resample(mask.to_sitk(), [int(s) for s in size], sitk.Transform(), sitk.sitkNearestNeighbor,
                        list(placement.origin), [float(s) for s in spacing], (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0), 0)
    return sitk.GetArrayFromImage(out)
