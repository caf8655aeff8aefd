"""96³ model-space crops cut directly from a CT in its own geometry, and the way back.

Resampling a whole CT to 1 mm costs seconds and gigabytes; a tumour needs only a 96 mm cube. So
the engine builds the **model-space grid** of the CT (the one :func:`backend.preprocess.to_model_space`
would produce: axes permuted/flipped to RAS like ``DICOMOrient``, 1 mm steps from the first oriented
voxel centre, extended into the outer half source voxel) *without* resampling anything, picks a 96³
window of it around the tumour (shifted inside the grid; centred with padding when the grid is
shorter than 96), and samples only that window from the CT with SimpleITK (linear for the CT,
nearest for masks). Crop voxels outside the model grid are padding: −1 in [−1, 1] and organ 0,
like the release's "pad to 96³ with the minimum".

Going back, the HU change and the blurred mask are sampled (linear) at the CT's own voxel centres
inside the crop's footprint; a voxel changes only where the sampled blurred mask is > 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from backend.io import Geometry

CROP = 96


def oriented_geometry(g: Geometry) -> Geometry:
    """The CT's grid with its axes permuted/flipped to RAS (what ``sitk.DICOMOrient(img, "RAS")`` gives)."""
    D = g.direction_matrix
    targets = (np.array([-1.0, 0, 0]), np.array([0, -1.0, 0]), np.array([0, 0, 1.0]))  # R, A, S in LPS
    used: set[int] = set()
    cols, perm, flips = [], [], []
    for t in targets:
        dots = [abs(float(D[:, j] @ t)) if j not in used else -1.0 for j in range(3)]
        j = int(np.argmax(dots))
        used.add(j)
        s = 1.0 if float(D[:, j] @ t) >= 0 else -1.0
        cols.append(s * D[:, j])
        perm.append(j)
        flips.append(s < 0)
    idx0 = [(g.size[j] - 1) if flips[m] else 0 for m, j in enumerate(perm)]
    origin = g.voxel_to_world(np.array(idx0, dtype=np.float64))
    return Geometry(
        tuple(g.size[j] for j in perm),
        tuple(g.spacing[j] for j in perm),
        tuple(origin),
        tuple(np.stack(cols, axis=1).ravel()),
    )


def model_grid(g: Geometry, spacing: float = 1.0) -> Geometry:
    """The CT's full 1 mm model-space grid (same rule as ``backend.preprocess``; nothing is resampled)."""
    o = oriented_geometry(g)
    src_sp = np.asarray(o.spacing)
    size = np.asarray(o.size)
    pad = np.floor(0.5 * src_sp / spacing + 1e-6)
    n = np.ceil((size - 1) * src_sp / spacing - 1e-6) + 1 + 2 * pad
    origin = np.asarray(o.origin) - o.direction_matrix @ (pad * spacing)
    return Geometry(tuple(int(v) for v in n), (spacing,) * 3, tuple(origin), o.direction)


@dataclass(frozen=True)
class Crop:
    """A 96³ window of the model grid: ``start`` (X, Y, Z) may be negative (padding)."""

    grid: Geometry  # the full model grid
    start: tuple[int, int, int]
    size: int = CROP

    @property
    def geometry(self) -> Geometry:
        origin = self.grid.voxel_to_world(np.asarray(self.start, dtype=np.float64))
        return Geometry((self.size,) * 3, self.grid.spacing, tuple(origin), self.grid.direction)

    def inside(self) -> np.ndarray:
        """(X, Y, Z) boolean: crop voxels that lie on the model grid (False = padding)."""
        ok = []
        for a in range(3):
            i = np.arange(self.size) + self.start[a]
            ok.append((i >= 0) & (i < self.grid.size[a]))
        return ok[0][:, None, None] & ok[1][None, :, None] & ok[2][None, None, :]


def crop_around(grid: Geometry, centre_world, size: int = CROP) -> Crop:
    """The window of ``grid`` centred on a world point, shifted inside the grid (padded if shorter)."""
    c = np.rint(grid.world_to_voxel(np.asarray(centre_world, dtype=np.float64))).astype(int)
    start = []
    for a in range(3):
        n = grid.size[a]
        if n <= size:
            start.append(-((size - n) // 2))
        else:
            start.append(int(np.clip(c[a] - size // 2, 0, n - size)))
    return Crop(grid, tuple(start), size)


def _sitk_image(array_zyx: np.ndarray, g: Geometry):
    import SimpleITK as sitk

    return g.apply_to(sitk.GetImageFromArray(np.ascontiguousarray(array_zyx)))


def sample(array_zyx: np.ndarray, source: Geometry, target: Geometry, *, nearest: bool, default: float = 0.0,
           extrapolate: bool = False) -> np.ndarray:
    """Resample a (z, y, x) array on ``source`` onto ``target``; returns a (z, y, x) array."""
    import SimpleITK as sitk

    arr = np.asarray(array_zyx)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    elif not nearest:
        arr = arr.astype(np.float32, copy=False)
    image = _sitk_image(arr, source)
    out = sitk.Resample(
        image, list(target.size), sitk.Transform(),
        sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear,
        target.origin, target.spacing, target.direction, float(default),
        image.GetPixelID(), bool(extrapolate),
    )
    return sitk.GetArrayFromImage(out)


def crop_from(array_zyx: np.ndarray, source: Geometry, crop: Crop, *, nearest: bool, pad: float) -> np.ndarray:
    """The crop of a file-space array as an (X, Y, Z) array; padding voxels get ``pad``.

    Only the crop's footprint (+1 voxel, all that linear interpolation reads) is handed to SimpleITK,
    not the whole CT: identical values, a fraction of the time on a full-resolution CT.
    """
    fp = footprint(crop, source)
    if any(s.stop <= s.start for s in fp):  # the crop misses the image: sample the whole array (all padding)
        fp = tuple(slice(0, n) for n in np.shape(array_zyx))
    sub = sub_geometry(source, fp)
    vals = sample(np.asarray(array_zyx)[fp], sub, crop.geometry, nearest=nearest, extrapolate=True).transpose(2, 1, 0)
    vals = np.array(vals, copy=True)
    vals[~crop.inside()] = pad
    return vals


def footprint(crop: Crop, target: Geometry, margin: int = 1) -> tuple[slice, slice, slice]:
    """(z, y, x) slices of ``target`` covering the crop's world box (+ ``margin`` voxels)."""
    g = crop.geometry
    corners = np.array([[i, j, k] for i in (-0.5, g.size[0] - 0.5) for j in (-0.5, g.size[1] - 0.5)
                        for k in (-0.5, g.size[2] - 0.5)])
    idx = target.world_to_voxel(g.voxel_to_world(corners))
    lo = np.maximum(np.floor(idx.min(0)).astype(int) - margin, 0)
    hi = np.minimum(np.ceil(idx.max(0)).astype(int) + 1 + margin, target.size)
    return tuple(slice(int(lo[a]), int(max(hi[a], lo[a]))) for a in (2, 1, 0))


def sub_geometry(g: Geometry, sl_zyx: tuple[slice, slice, slice]) -> Geometry:
    start = np.array([sl_zyx[2].start, sl_zyx[1].start, sl_zyx[0].start], dtype=np.float64)
    size = (sl_zyx[2].stop - sl_zyx[2].start, sl_zyx[1].stop - sl_zyx[1].start, sl_zyx[0].stop - sl_zyx[0].start)
    return Geometry(size, g.spacing, tuple(g.voxel_to_world(start)), g.direction)


def back_to_file(values_xyz: np.ndarray, crop: Crop, target: Geometry, sl_zyx) -> np.ndarray:
    """Sample a crop (X, Y, Z) float array (linear, 0 outside) on the file sub-grid ``sl_zyx``."""
    sub = sub_geometry(target, sl_zyx)
    return sample(np.ascontiguousarray(values_xyz.transpose(2, 1, 0)), crop.geometry, sub, nearest=False, default=0.0)


# --------------------------------------------------------------------------------------------
# tumour components -> groups that share one crop
# --------------------------------------------------------------------------------------------
GROUP_EXTENT_MM = 80.0  # tumour components whose union fits in 80 mm share one 96 mm crop


def component_diameters_mm(mask: np.ndarray, spacing_zyx) -> list[float]:
    """Largest diameter (mm) of each connected tumour (26-connected) in ``mask``, largest first."""
    from backend.synthesis.masks import largest_diameter_mm

    box = bbox_slices(mask, (0, 0, 0))
    lab, n = ndimage.label(mask[box], structure=np.ones((3, 3, 3), bool))
    return sorted((largest_diameter_mm(lab[sl] == k + 1, spacing_zyx)
                   for k, sl in enumerate(ndimage.find_objects(lab))), reverse=True)


def bbox_slices(mask: np.ndarray, margin: Sequence[int]) -> tuple[slice, ...]:
    """The bounding box of ``mask`` grown by ``margin`` voxels per axis (clipped to the array)."""
    nz = np.argwhere(mask)
    lo = np.maximum(nz.min(0) - np.asarray(margin), 0)
    hi = np.minimum(nz.max(0) + 1 + np.asarray(margin), mask.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def group_components(tumor: np.ndarray, geometry: Geometry, extent_mm: float = GROUP_EXTENT_MM) -> list[np.ndarray]:
    """Split a (z, y, x) tumour mask into groups of components that fit together in one crop.

    Works on the tumour's bounding box only (labelling a whole CT costs ~0.2 s per 10 M voxels).
    """
    if not tumor.any():
        return []
    box = bbox_slices(tumor, (1, 1, 1))
    offset = [s.start for s in box]
    lab, n = ndimage.label(tumor[box], structure=np.ones((3, 3, 3), bool))
    objs = [tuple(slice(o.start + d, o.stop + d) for o, d in zip(sl, offset)) for sl in ndimage.find_objects(lab)]
    sizes = ndimage.sum_labels(tumor[box], lab, index=np.arange(1, n + 1))
    groups: list[tuple[np.ndarray, np.ndarray, list[int]]] = []  # (world lo, world hi, ids)
    for i in np.argsort(-sizes):
        sl = objs[i]
        corners = np.array([[sl[2].start, sl[1].start, sl[0].start], [sl[2].stop - 1, sl[1].stop - 1, sl[0].stop - 1]], float)
        w = geometry.voxel_to_world(np.array([[x, y, z] for x in corners[:, 0] for y in corners[:, 1] for z in corners[:, 2]]))
        lo, hi = w.min(0), w.max(0)
        for g in groups:
            nlo, nhi = np.minimum(g[0], lo), np.maximum(g[1], hi)
            if np.all(nhi - nlo <= extent_mm):
                g[0][:], g[1][:] = nlo, nhi
                g[2].append(int(i) + 1)
                break
        else:
            groups.append((lo.copy(), hi.copy(), [int(i) + 1]))
    out = []
    for g in groups:
        full = np.zeros(tumor.shape, bool)
        full[box] = np.isin(lab, g[2])
        out.append(full)
    return out


def group_crop(geometry: Geometry, group: np.ndarray) -> tuple[Crop, np.ndarray]:
    """The 96 mm model-grid crop the diffusion model paints for a tumour group, and the group's centre (world)."""
    nz = np.argwhere(group)
    centre_idx = (nz.min(0) + nz.max(0)) / 2.0  # (z, y, x)
    centre_world = geometry.voxel_to_world(centre_idx[::-1])
    return crop_around(model_grid(geometry), centre_world), centre_world


def outside_crop(geometry: Geometry, group: np.ndarray) -> np.ndarray:
    """Voxels of ``group`` whose centres lie outside its crop: diffusion cannot paint them."""
    crop, _ = group_crop(geometry, group)
    idx = np.argwhere(group)
    pos = crop.geometry.world_to_voxel(geometry.voxel_to_world(idx[:, ::-1].astype(np.float64)))
    out = np.zeros(group.shape, bool)
    out[tuple(idx.T)] = np.any((pos < -0.5) | (pos > crop.size - 0.5), axis=1)
    return out
