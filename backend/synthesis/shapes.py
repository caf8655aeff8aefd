"""Tumour shapes and locations on the CT's own grid, for the model-based method (Hu et al., CVPR 2023).

**Shape** (:func:`tumor_shape`): the release's elastic ellipsoid, built in millimetres on the CT's
grid instead of a 1 mm model grid: semi-axes drawn from the size class's range
(:data:`backend.synthesis.masks.SIZE_CLASSES`: tiny 3–5 mm, small 6–10 mm, medium 12–20 mm, large
24–64 mm), a random rotation, and a smooth elastic displacement of every point (a 3×3×3 control grid
of Gaussian displacements with the class's sigma in mm, cubic interpolation). Tiny and small
tumours stay round; medium and large ones are **lobulated**: 2–4 smaller ellipsoids (0.45–0.7 of
the main semi-axes) centred 0.75–1.0 of the way to the main surface in random directions bulge out
of it, the bosselated outline of confluent nodules, and the whole is deformed together.

**Location** (:func:`place_tumor`): a centre inside the organ where the whole shape fits inside it
(else at least ``edge_fraction`` of the tumour's radius deep, else anywhere in the organ), far enough
from everything the tumour must not collide with that the whole shape misses it by ``clearance_mm``
(Hu et al.'s vessel-collision rule): the vessels of an enhanced organ (:func:`vessel_mask`: bright
tubular voxels) and any ``avoid`` mask (labelled real tumours, labelled vessels). When no such
centre exists the constraints are relaxed step by step and the provenance says so. The mask is
clipped to the organ and never overlaps ``avoid``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from backend.errors import DiffTumorError
from backend.synthesis.masks import SIZE_CLASSES

LOBULATED_SIZES = ("medium", "large")


def _rotation(rng: np.random.Generator) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    return Rotation.random(random_state=rng).as_matrix()


def draw_shape(size: str, rng: np.random.Generator, *, lobulated: bool | None = None) -> dict:
    """Draw the parameters of one tumour of class ``size`` (all lengths in mm)."""
    if size not in SIZE_CLASSES:
        raise ValueError(f"size {size!r} is not one of {sorted(SIZE_CLASSES)}")
    sc = SIZE_CLASSES[size]
    lo, hi = sc.semi_axes
    semi = [float(v) for v in rng.uniform(lo, hi, size=3)]
    elastic = float(rng.uniform(*sc.sigma))
    lobulated = size in LOBULATED_SIZES if lobulated is None else bool(lobulated)
    k = int(rng.integers(2, 5)) if lobulated else 0
    dirs = rng.standard_normal((k, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True) + 1e-12
    return {
        "size": size,
        "semi_axes_mm": semi,
        "rotation": _rotation(rng).tolist(),
        "elastic_mm": elastic,
        "elastic_grid": rng.standard_normal((3, 3, 3, 3)).tolist(),
        "lobes": k,
        "lobe_directions": dirs.tolist(),
        "lobe_radii": [float(v) for v in rng.uniform(0.45, 0.7, size=k)],  # of the main body's semi-axes
        "lobe_offsets": [float(v) for v in rng.uniform(0.75, 1.0, size=k)],  # lobe centre / main semi-axis
    }


def tumor_shape(params: dict, spacing: Sequence[float]) -> np.ndarray:
    """Boolean box (odd size, centred) holding the shape ``params`` (from :func:`draw_shape`) on a grid
    with ``spacing`` (mm per array axis)."""
    s = np.asarray(spacing, dtype=np.float64)
    semi = np.asarray(params["semi_axes_mm"], dtype=np.float64)
    radii = np.asarray(params["lobe_radii"], dtype=np.float64)
    offsets = np.asarray(params["lobe_offsets"], dtype=np.float64)
    dirs = np.asarray(params["lobe_directions"], dtype=np.float64).reshape(-1, 3)
    amp = float(params["elastic_mm"])
    widest = max([1.0, *(offsets + radii)])
    reach = float(semi.max()) * widest + 3.0 * amp + max(s)
    half = np.ceil(reach / s).astype(int)
    axes = [(np.arange(-h, h + 1) * sp).astype(np.float32) for h, sp in zip(half, s)]
    pts = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)  # (n0, n1, n2, 3) mm from the centre
    if amp > 0:
        grid = np.asarray(params["elastic_grid"], dtype=np.float64) * amp  # (3 components, 3, 3, 3)
        # the field is smooth (3 control points across the box): evaluate it on <= 17 points per axis and
        # interpolate linearly to every voxel (control-grid coordinate = clipped position / reach + 1)
        n = pts.shape[:3]
        m = [min(k, 17) for k in n]
        coarse = [np.clip(np.linspace(-h * sp, h * sp, k) / reach, -1.0, 1.0) + 1.0 for h, sp, k in zip(half, s, m)]
        u = np.stack(np.meshgrid(*coarse, indexing="ij"))
        disp = [ndimage.map_coordinates(grid[c], u, order=3, mode="nearest") for c in range(3)]
        zoom = [a / b for a, b in zip(n, m)]  # output shape n; grid_mode=False aligns the corner voxels
        pts = pts + np.stack([ndimage.zoom(dc, zoom, order=1, grid_mode=False, output=np.float32) for dc in disp], axis=-1)
    local = pts @ np.asarray(params["rotation"], dtype=np.float64)
    q = local / semi  # main body: the unit ball in these coordinates
    shape = (q**2).sum(-1) <= 1.0
    for d, r, o in zip(dirs, radii, offsets):  # lobes: smaller balls centred near the surface (confluent nodules)
        shape |= (((q - o * d) / r) ** 2).sum(-1) <= 1.0
    if not shape.any():
        shape[tuple(half)] = True
    return shape


def vessel_mask(ct: np.ndarray, organ: np.ndarray, spacing: Sequence[float], *, scale_mm: float = 1.5,
                min_excess_hu: float = 25.0) -> np.ndarray:
    """Bright tubular voxels of an enhanced organ: the vessels a tumour should not grow through.

    On the organ's bounding box: the CT smoothed at ``scale_mm``; voxels brighter than the organ's
    median by max(``min_excess_hu``, 3 robust std of the smoothed organ) whose Hessian has at least
    two clearly negative eigenvalues (a bright line or spot, not a plateau), then every bright voxel
    connected to such a seed, dilated by one voxel. Call it for enhanced organs only: in a
    non-contrast CT the vessels are not brighter than the parenchyma.
    """
    organ = np.asarray(organ, bool)
    out = np.zeros(organ.shape, bool)
    if organ.sum() < 27:
        return out
    s = np.asarray(spacing, dtype=np.float64)
    nz = np.argwhere(organ)
    box = tuple(slice(int(a), int(b) + 1) for a, b in zip(nz.min(0), nz.max(0)))
    sub = np.asarray(ct[box], dtype=np.float32)
    org = organ[box]
    sig = np.maximum(scale_mm / s, 0.5)
    smooth = ndimage.gaussian_filter(sub, sig, mode="nearest")
    vals = smooth[org]
    med = float(np.median(vals))
    rstd = 1.4826 * float(np.median(np.abs(vals - med)))
    bright = org & (smooth > med + max(min_excess_hu, 3.0 * rstd))
    if not bright.any():
        return out
    # Hessian of the smoothed CT in mm^-2 (scale-normalised by scale_mm^2)
    hess = np.empty(sub.shape + (3, 3), np.float32)
    for i in range(3):
        for j in range(i, 3):
            order = [0, 0, 0]
            order[i] += 1
            order[j] += 1
            h = ndimage.gaussian_filter(sub, sig, order=order, mode="nearest") / (s[i] * s[j]) * scale_mm**2
            hess[..., i, j] = h
            hess[..., j, i] = h
    ev = np.linalg.eigvalsh(hess[bright])  # ascending: the two most negative first
    thr = -0.25 * max(min_excess_hu, 3.0 * rstd)
    seeds = np.zeros(sub.shape, bool)
    seeds[bright] = (ev[:, 0] < thr) & (ev[:, 1] < thr)
    lab, n = ndimage.label(bright, structure=np.ones((3, 3, 3), bool))
    keep = np.unique(lab[seeds])
    keep = keep[keep > 0]
    vessels = np.isin(lab, keep)
    vessels = ndimage.binary_dilation(vessels) & org
    out[box] = vessels
    return out


def place_tumor(organ: np.ndarray, spacing: Sequence[float], shape: np.ndarray, rng: np.random.Generator, *,
                obstacles: np.ndarray | None = None, edge_fraction: float = 0.8,
                clearance_mm: float = 3.0) -> tuple[np.ndarray, dict]:
    """Put ``shape`` (a centred box from :func:`tumor_shape`) at a random centre in ``organ`` that keeps the
    whole shape ``clearance_mm`` clear of ``obstacles``; returns (mask clipped to the organ minus obstacles, info)."""
    organ = np.asarray(organ, bool)
    if not organ.any():
        raise DiffTumorError("organ mask: the organ is absent (no voxel carries its label)")
    s = np.asarray(spacing, dtype=np.float64)
    obstacles = np.zeros(organ.shape, bool) if obstacles is None else np.asarray(obstacles, bool)
    half = np.array(shape.shape) // 2
    pts = (np.argwhere(shape) - half) * s
    shape_radius = float(np.sqrt((pts**2).sum(1)).max()) + 0.5 * float(s.max())
    eq_radius = (3.0 * shape.sum() * np.prod(s) / (4.0 * math.pi)) ** (1.0 / 3.0)
    nz = np.argwhere(organ)
    margin = np.ceil(shape_radius / s).astype(int) + 1
    lo = np.maximum(nz.min(0) - margin, 0)
    hi = np.minimum(nz.max(0) + 1 + margin, organ.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    org = organ[box]
    obs = obstacles[box]
    d_edge = ndimage.distance_transform_edt(np.pad(org, 1), sampling=s)[1:-1, 1:-1, 1:-1]  # the image border is an edge
    d_obs = ndimage.distance_transform_edt(~obs, sampling=s) if obs.any() else np.full(org.shape, np.inf)
    info: dict = {"shape_radius_mm": round(shape_radius, 2), "obstacle_voxels": int(obstacles.sum())}
    # first choice: the whole shape inside the organ (a tumour cut flat by the organ's surface looks
    # wrong; one that reaches the surface should bulge it, which the mass effect does); then a centre
    # at least edge_fraction of the radius deep; then anywhere; obstacle clearance is given up last
    inside = shape_radius + clearance_mm
    attempts = ((inside, 1.0), (edge_fraction * eq_radius, 1.0), (0.5 * edge_fraction * eq_radius, 1.0), (0.0, 1.0),
                (0.0, 0.5), (0.0, 0.0))
    for depth, of in attempts:
        allowed = org & (d_edge >= depth) & (d_obs > of * (shape_radius + clearance_mm))
        if allowed.any():
            info.update(centre_depth_mm=round(float(depth), 2), fits_inside=depth == inside,
                        obstacle_clearance=of, relaxed=of < 1.0 or depth == 0.0)
            break
    cand = np.argwhere(allowed)
    c = cand[rng.integers(len(cand))] + lo
    mask = np.zeros(organ.shape, bool)
    dst, src = [], []
    for ci, h, n, N in zip(c, half, shape.shape, organ.shape):
        start = int(ci) - int(h)
        a, b = max(start, 0), min(start + n, N)
        dst.append(slice(a, b))
        src.append(slice(a - start, b - start))
    mask[tuple(dst)] = shape[tuple(src)]
    collided = int((mask & obstacles).sum())
    mask &= organ & ~obstacles
    if not mask.any():
        mask[tuple(c)] = True
    info.update(centre_voxel=[int(v) for v in c], collision_voxels=collided, voxels=int(mask.sum()),
                inside_fraction=round(float(mask.sum()) / float(max(shape.sum(), 1)), 3))
    return mask, info


def random_tumor(ct: np.ndarray, organ: np.ndarray, spacing: Sequence[float], rng: np.random.Generator, *,
                 size: str = "small", organ_name: str | None = None, avoid: np.ndarray | None = None,
                 lobulated: bool | None = None, phase: str = "auto",
                 vessels: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """One model-based tumour mask on the CT's grid: shape of class ``size``, a vessel- and
    ``avoid``-free location in ``organ``. Returns (bool mask, provenance dict). ``vessels`` (from
    :func:`organ_vessels`) skips finding them again."""
    organ = np.asarray(organ, bool)
    avoid = np.zeros(organ.shape, bool) if avoid is None else np.asarray(avoid, bool)
    organ_free = organ & ~avoid
    if vessels is None:
        vessels, ph, organ_hu = organ_vessels(ct, organ_free, spacing, organ_name, phase)
    else:
        from backend.synthesis.model_based import contrast_phase

        ph, organ_hu, _ = contrast_phase(ct, organ_free, organ_name, phase)
    params = draw_shape(size, rng, lobulated=lobulated)
    shape = tumor_shape(params, spacing)
    mask, info = place_tumor(organ_free, spacing, shape, rng, obstacles=vessels | avoid)
    prov = {
        "size": size,
        "semi_axes_mm": [round(v, 2) for v in params["semi_axes_mm"]],
        "elastic_mm": round(params["elastic_mm"], 3),
        "lobes": params["lobes"],
        "lobe_radii": [round(v, 3) for v in params["lobe_radii"]],
        "lobe_offsets": [round(v, 3) for v in params["lobe_offsets"]],
        "phase": ph,
        "organ_median_hu": round(organ_hu, 1),
        "vessel_voxels": int(vessels.sum()),
        "avoid_voxels": int(avoid.sum()),
        **info,
    }
    return mask, prov


def organ_vessels(ct: np.ndarray, organ: np.ndarray, spacing: Sequence[float], organ_name: str | None = None,
                  phase: str = "auto") -> tuple[np.ndarray, str, float]:
    """(vessel mask, phase, organ median HU): :func:`vessel_mask` in an enhanced organ, none in a non-contrast one."""
    from backend.synthesis.model_based import contrast_phase

    ph, organ_hu, _ = contrast_phase(ct, organ, organ_name, phase)
    vessels = vessel_mask(ct, organ, spacing) if ph == "enhanced" else np.zeros(np.shape(organ), bool)
    return vessels, ph, organ_hu


def check_fits(organ: np.ndarray, spacing: Sequence[float], size: str, count: int = 1, *, organ_name: str = "organ",
               name: str = "organ mask") -> None:
    """Refuse an organ (on the CT's grid) smaller than the smallest tumour of ``size``, or a ``count`` of them that
    cannot fit in its volume (as :func:`backend.synthesis.masks.check_organ_fits` does on the 1 mm grid)."""
    volume = float(np.count_nonzero(organ)) * float(np.prod(spacing))  # mm³
    if volume == 0:
        raise DiffTumorError(f"{name}: the organ is absent (no voxel carries its label)")
    a = SIZE_CLASSES[size].semi_axes[0]
    need = 4.0 / 3.0 * math.pi * a**3
    if volume < need:
        raise DiffTumorError(f"{name}: the {organ_name} is {volume:.0f} mm³, too small for a {size} tumour (at least "
                             f"{need:.0f} mm³); choose a smaller size")
    if count > volume // need:
        from backend.synthesis.masks import _size_words, _volume_ml

        raise DiffTumorError(f"{name}: the {organ_name} is {_volume_ml(int(volume))}; at most {int(volume // need)} "
                             f"{_size_words(size)} fit in that volume (asked for {count})")


def random_tumors(ct: np.ndarray, organ: np.ndarray, spacing: Sequence[float], rng: np.random.Generator, *,
                  size: str | None = None, count: int | None = None, organ_name: str | None = None,
                  avoid: np.ndarray | None = None, phase: str = "auto",
                  gap_mm: float | None = None) -> tuple[np.ndarray, list[dict]]:
    """Model-based tumours as the engine draws them for ``Generated(size, count)``: the size class (None:
    the release's training mix, :func:`backend.synthesis.masks.sample_size_class`) and count (None: the
    class's range) drawn from ``rng`` as the release does, then one :func:`random_tumor` after the other,
    each keeping clear of the vessels, of ``avoid`` (labelled real tumours) and of the tumours placed before
    it by ``gap_mm`` (default: one voxel more than the coarsest spacing, so they stay apart on the CT's grid).
    Returns (bool mask, one provenance dict per tumour)."""
    from backend.synthesis.masks import SIZE_CLASSES, sample_size_class

    organ = np.asarray(organ, bool)
    avoid = np.zeros(organ.shape, bool) if avoid is None else np.asarray(avoid, bool)
    if size is None:
        size = sample_size_class(rng)
    if count is None:
        lo, hi = SIZE_CLASSES[size].count
        count = int(rng.integers(lo, hi + 1))
    s = np.asarray(spacing, dtype=np.float64)
    check_fits(organ & ~avoid, s, size, int(count), organ_name=organ_name or "organ")
    gap = float(s.max()) + 1.0 if gap_mm is None else float(gap_mm)
    vessels, _, _ = organ_vessels(ct, organ & ~avoid, s, organ_name, phase)
    placed = np.zeros(organ.shape, bool)
    infos = []
    for _ in range(int(count)):
        near = placed
        if placed.any():
            near = ndimage.distance_transform_edt(~placed, sampling=s) <= gap
        mask, info = random_tumor(ct, organ, s, rng, size=size, organ_name=organ_name, avoid=avoid | near,
                                  phase=phase, vessels=vessels)
        placed |= mask
        infos.append(info)
    return placed, infos
