"""Random tumours from the release's generator, placed on a CT's own grid.

The generator (:func:`backend.synthesis.masks.generate_tumor_mask`) works in 1 mm model space; these
functions run it on the organ's neighbourhood only and bring the result back to the CT's (z, y, x) grid by
nearest neighbour. :func:`random_tumor_mask` draws all tumours jointly (as released; the engine's
``Generated`` mask source), :func:`random_tumor_masks` one mask per tumour (the napari placement widget).
Re-exported by :mod:`backend.synthesis.engine`.
"""

from __future__ import annotations

import numpy as np

from backend.errors import DiffTumorError
from backend.io import Geometry, Volume
from backend.synthesis import crops, masks
from backend.synthesis.crops import bbox_slices


def _organ_in_model_space(grid: Geometry, organ_arr: np.ndarray, size: str):
    """The organ's neighbourhood as a 1 mm model-space (X, Y, Z) mask: (mask, model grid, file slices, sub-grid)."""
    reach_mm = max(10.0, 2.0 * masks.SIZE_CLASSES[size].semi_axes[1])  # room for the class's largest tumour
    margin = [int(np.ceil(reach_mm / s)) for s in grid.spacing[::-1]]
    sl = bbox_slices(organ_arr, margin)
    sub_g = crops.sub_geometry(grid, sl)
    model = crops.model_grid(sub_g)
    organ_m = crops.sample(organ_arr[sl], sub_g, model, nearest=True, extrapolate=True).transpose(2, 1, 0).astype(bool)
    return organ_m, model, sl, sub_g


def _mask_to_file(mask_m: np.ndarray, params, model: Geometry, sl, sub_g: Geometry, full: Geometry, shape) -> np.ndarray:
    back = crops.sample(np.ascontiguousarray(mask_m.transpose(2, 1, 0)), model, sub_g, nearest=True).astype(bool)
    tumor = np.zeros(shape, bool)
    tumor[sl] = back
    if not tumor.any():  # thinner than a slice: keep the voxel nearest each centre
        for p in params:
            k = np.clip(np.rint(full.world_to_voxel(model.voxel_to_world(np.asarray(p.centre, float)))).astype(int),
                        0, np.asarray(full.size) - 1)
            tumor[k[2], k[1], k[0]] = True
    for p in params:  # report centres in world coordinates (LPS mm) and on the CT's grid too
        world = model.voxel_to_world(np.asarray(p.centre, float))
        p.centre_world_mm = tuple(round(float(v), 2) for v in world)
        p.centre_voxel_xyz = tuple(int(v) for v in np.rint(full.world_to_voxel(world)))
    return tumor


def _random_setup(ct, organ_mask, organ: str, size, count, seed):
    from backend.organs import parse_organ

    geometry = ct.geometry if isinstance(ct, Volume) else ct
    organ_arr = np.asarray(organ_mask) != 0
    if organ_arr.shape != tuple(geometry.size[::-1]):
        raise DiffTumorError(f"organ mask: array shape {organ_arr.shape} differs from the CT's {tuple(geometry.size[::-1])} (z, y, x)")
    organ = parse_organ(organ)
    if not organ_arr.any():
        raise DiffTumorError(f"organ mask: the organ '{organ}' is absent (no voxel)")
    if size is not None and size not in masks.SIZE_CLASSES:
        raise DiffTumorError(f"size class '{size}': choose one of {', '.join(masks.SIZE_CLASSES)}")
    if count is not None and int(count) < 1:
        raise DiffTumorError(f"number of tumours: must be at least 1, got {count}")
    rng = masks.as_rng(seed)
    if size is None:
        size = masks.sample_size_class(rng)
    return geometry, organ_arr, organ, size, rng


def random_tumor_mask(ct: Volume | Geometry, organ_mask, *, organ: str, size: str | None = None,
                      count: int | None = None, seed=0) -> tuple[np.ndarray, list[masks.TumorParams]]:
    """Tumours drawn by the release's generator at valid places in the organ, on the CT's own grid.

    ``ct``: the CT Volume (or its Geometry); ``organ_mask``: (z, y, x) on that grid. ``size`` None draws
    the release's training mix and ``count`` None the class's count range; ``seed`` is an int or a
    ``numpy.random.Generator`` (used as is, so a caller's stream continues). The generator runs in
    1 mm model space on the organ's neighbourhood only (one joint draw, as released: one clipping
    decision for all tumours) and is brought back by nearest neighbour; a tumour thinner than a
    voxel keeps the voxel nearest its centre. Returns (bool mask (z, y, x), one
    :class:`~backend.synthesis.masks.TumorParams` per tumour with ``centre_world_mm`` filled in).
    """
    return _random_joint(*_random_setup(ct, organ_mask, organ, size, count, seed), count)


def _random_joint(geometry, organ_arr, organ, size, rng, count, prepared=None):
    organ_m, model, sl, sub_g = prepared(size) if prepared else _organ_in_model_space(geometry, organ_arr, size)
    masks.check_organ_fits(organ_m, size, name=f"organ '{organ}'")
    gap = int(np.ceil(max(geometry.spacing))) + 1  # 1 mm voxels between tumours: still apart on the CT's grid
    mask_m, params = masks.generate_tumor_mask(organ_m, organ, size=size, count=count, rng=rng, gap=gap)
    return _mask_to_file(mask_m, params, model, sl, sub_g, geometry, organ_arr.shape), params


def random_tumor_masks(ct: Volume | Geometry, organ_mask, *, organ: str, size: str | None = None, count: int = 1,
                       seed=0) -> tuple[list[np.ndarray], list[masks.TumorParams]]:
    """Like :func:`random_tumor_mask` but one mask per tumour (one generator draw each, same seeded stream):
    for tools that keep each tumour apart (the napari placement gives each its own label id)."""
    geometry, organ_arr, organ, size, rng = _random_setup(ct, organ_mask, organ, size, count, seed)
    organ_m, model, sl, sub_g = _organ_in_model_space(geometry, organ_arr, size)
    masks.check_organ_fits(organ_m, size, name=f"organ '{organ}'")
    masks.check_count_fits(organ_m, size, int(count), organ_name=organ)  # (separate draws: no placement apart)
    shapes, params = [], []
    for _ in range(int(count)):
        mask_m, ps = masks.generate_tumor_mask(organ_m, organ, size=size, count=1, rng=rng)
        shapes.append(_mask_to_file(mask_m, ps, model, sl, sub_g, geometry, organ_arr.shape))
        params.extend(ps)
    return shapes, params
