"""Quality numbers, failure flags and the review log for one synthetic tumour (no Qt, no napari).

Everything works on numpy arrays in SimpleITK order (z, y, x) with ``spacing`` given in the same
(z, y, x) order (napari's layer ``scale``). The widget in ``_qt/inspection_widget.py`` only displays what
:func:`tumor_metrics` and :func:`failure_flags` return and appends reviews via :func:`append_review`.

Metrics (all HU or mm):

* ``mean_hu`` / ``std_hu`` inside the tumour; ``rim_*`` in a shell of ``rim_mm`` (3 mm) just outside
  it, clipped to the organ (fat or air beyond the organ's edge is not tumour surroundings); ``organ_*`` in
  the rest of the organ (organ minus tumour minus rim minus ``existing_tumor``, the tumours labelled in
  the organ labels, e.g. label 2 of an MSD/LiTS map: a real metastasis is not liver parenchyma).
* ``contrast_hu`` = tumour mean - organ mean.
* ``noise_ratio``: robust standard deviation (1.4826 x MAD) of the high-pass residual
  ``ct - gaussian(ct, 1 voxel)`` inside the tumour interior (2 voxels from the edge) divided by the
  same in the surrounding organ (1 = same texture; the residual's
  variance is the high-frequency part of the noise power spectrum). ``noise_similarity`` =
  ``min(r, 1/r)`` in (0, 1].
* ``edge_gradient_hu_per_mm``: mean gradient magnitude on the tumour boundary voxels (both sides).
* ``edge_width_mm``: the 10-90 % rise distance of the mean HU profile across the boundary, built by
  averaging voxels by signed distance to the tumour surface (noise averages out).
  ``edge_width_step_mm`` is the same measurement of a bare step (0 inside the mask, 1 outside) on the
  same grid: what "no blur at all" measures for this tumour's shape and spacing.
* ``sphericity`` = pi^(1/3) (6 V)^(2/3) / A with A from marching cubes (1 for a sphere; ~0.9 for a
  voxelised sphere); ``elongation`` = sqrt(largest / smallest PCA eigenvalue of the voxel
  coordinates in mm); ``solidity`` = volume / convex-hull volume (a sickle is far from convex).

Failure flags (paper appendix F.2) and their thresholds live in :class:`FlagThresholds`.
"""

from __future__ import annotations

import csv
import fcntl
import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from scipy import ndimage

from backend.errors import DiffTumorError

#: Failure categories a reviewer may tick (paper appendix F.2 + "other").
FAILURE_CATEGORIES = ("too_sharp_edge", "sickle_or_strip_shape", "fat_density", "fluid_density",
                      "noise_mismatch", "no_mass_effect", "other")


@dataclass(frozen=True)
class FlagThresholds:
    """When an automatic flag is raised. Defaults are documented choices, not fitted values."""

    sharp_edge_factor: float = 1.25  # too sharp: edge width < factor x the width a bare step measures on this grid
    min_sphericity: float = 0.6      # marching-cubes sphericity below this looks like a strip/sheet
    max_elongation: float = 3.0      # PCA axis ratio above this looks like a strip
    min_solidity: float = 0.7        # volume / convex hull below this looks like a sickle
    fat_max_hu: float = -20.0        # mean tumour HU below this = fat density
    fluid_abs_hu: float = 20.0       # |mean tumour HU| <= this = water/fluid density ...
    contrast_organ_min_hu: float = 80.0  # ... flagged only when the organ is enhanced (contrast CT)
    noise_similarity_min: float = 0.5    # high-pass std ratio outside [0.5, 2] = noise mismatch
    mass_effect_min_diameter_mm: float = 20.0  # only tumours this large are expected to push tissue
    mass_effect_shell_mm: float = 10.0   # shell outside tumour+rim where displacement would show
    mass_effect_min_change_hu: float = 5.0  # mean |change| in that shell below this = nothing moved


def _spacing(spacing: Sequence[float] | None) -> np.ndarray:
    s = np.ones(3) if spacing is None else np.asarray(spacing, dtype=np.float64)
    if s.shape != (3,) or np.any(s <= 0):
        raise ValueError(f"spacing must be 3 positive numbers (z, y, x), got {spacing}")
    return s


def rim_mask(tumor: np.ndarray, spacing=None, width_mm: float = 3.0) -> np.ndarray:
    """Voxels outside ``tumor`` within ``width_mm`` of it (Euclidean distance in mm)."""
    tumor = np.asarray(tumor, bool)
    if not tumor.any():
        return np.zeros_like(tumor)
    dist = ndimage.distance_transform_edt(~tumor, sampling=_spacing(spacing))
    return (~tumor) & (dist <= width_mm)


def region_stats(ct: np.ndarray, mask: np.ndarray) -> tuple[float, float, int]:
    """(mean, std, n) of ``ct`` inside ``mask``; NaNs for an empty mask."""
    values = np.asarray(ct)[np.asarray(mask, bool)]
    if values.size == 0:
        return float("nan"), float("nan"), 0
    values = values.astype(np.float64)
    return float(values.mean()), float(values.std()), int(values.size)


def highpass_residual(ct: np.ndarray, sigma_vox: float = 1.0) -> np.ndarray:
    """``ct - gaussian(ct)``: the high-frequency part that carries the CT noise texture."""
    ct = np.asarray(ct, dtype=np.float32)
    return ct - ndimage.gaussian_filter(ct, sigma_vox)


def boundary_voxels(mask: np.ndarray) -> np.ndarray:
    """Voxels on either side of the mask surface (inner + outer 6-connected shell)."""
    mask = np.asarray(mask, bool)
    return ndimage.binary_dilation(mask) & ~ndimage.binary_erosion(mask)


def signed_distance_mm(tumor: np.ndarray, spacing=None) -> np.ndarray:
    """Signed distance (mm) of every voxel to the tumour surface, negative inside; the surface sits half
    a voxel outside the inner voxels, so both sides are shifted by half the smallest step."""
    s = _spacing(spacing)
    tumor = np.asarray(tumor, bool)
    d_out = ndimage.distance_transform_edt(~tumor, sampling=s)
    d_in = ndimage.distance_transform_edt(tumor, sampling=s)
    half = 0.5 * float(s.min())
    return np.where(tumor, half - d_in, d_out - half)


def edge_profile(ct: np.ndarray, tumor: np.ndarray, spacing=None, max_mm: float | None = None, *,
                 signed: np.ndarray | None = None):
    """Mean HU as a function of signed distance (mm) to the tumour surface (negative inside).

    Returns (distances, means) for non-empty bins of width half the smallest spacing. ``signed``: the
    tumour's :func:`signed_distance_mm`, when already computed (it is the expensive part).
    """
    s = _spacing(spacing)
    max_mm = max_mm if max_mm is not None else max(6.0, 3.0 * float(s.max()))
    if signed is None:
        signed = signed_distance_mm(tumor, s)
    half = 0.5 * float(s.min())
    sel = np.abs(signed) <= max_mm
    d, v = signed[sel], np.asarray(ct, dtype=np.float64)[sel]
    width = half
    bins = np.round(d / width).astype(int)
    uniq, inv = np.unique(bins, return_inverse=True)
    sums = np.bincount(inv, weights=v)
    counts = np.bincount(inv)
    return uniq * width, sums / counts


def edge_width_mm(distances: np.ndarray, profile: np.ndarray) -> float:
    """10-90 % rise distance of an edge profile (NaN when there is no contrast)."""
    if len(profile) < 3:
        return float("nan")
    inside = profile[distances < 0]
    outside = profile[distances > 0]
    if inside.size == 0 or outside.size == 0:
        return float("nan")
    lo_val, hi_val = float(np.mean(inside[: max(1, inside.size // 2)])), float(np.mean(outside[-max(1, outside.size // 2):]))
    span = hi_val - lo_val
    if abs(span) < 1e-6:
        return float("nan")
    frac = (profile - lo_val) / span  # 0 inside -> 1 outside
    frac = np.maximum.accumulate(np.clip(frac, 0, 1))  # monotone envelope, robust to noise wiggles
    d10 = float(np.interp(0.1, frac, distances)) if frac[-1] >= 0.1 else float("nan")
    d90 = float(np.interp(0.9, frac, distances)) if frac[-1] >= 0.9 else float("nan")
    return d90 - d10


def surface_area_mm2(mask: np.ndarray, spacing=None) -> float:
    """Surface area of a binary mask from marching cubes (mm^2)."""
    from skimage import measure

    padded = np.pad(np.asarray(mask, np.float32), 1)
    verts, faces, _, _ = measure.marching_cubes(padded, level=0.5, spacing=tuple(_spacing(spacing)))
    return float(measure.mesh_surface_area(verts, faces))


def shape_metrics(mask: np.ndarray, spacing=None) -> dict:
    """volume_ml, equivalent diameter, sphericity, elongation, flatness and solidity of a mask."""
    s = _spacing(spacing)
    mask = np.asarray(mask, bool)
    n = int(mask.sum())
    out = {"volume_ml": n * float(np.prod(s)) / 1000.0, "equivalent_diameter_mm": float("nan"),
           "sphericity": float("nan"), "elongation": float("nan"), "flatness": float("nan"),
           "solidity": float("nan")}
    if n == 0:
        return out
    volume = n * float(np.prod(s))
    out["equivalent_diameter_mm"] = (6.0 * volume / math.pi) ** (1 / 3)
    if n < 8:  # too few voxels for a surface or a covariance
        return out
    area = surface_area_mm2(mask, s)
    out["sphericity"] = (math.pi ** (1 / 3)) * (6.0 * volume) ** (2 / 3) / area
    coords = np.argwhere(mask) * s
    cov = np.cov(coords, rowvar=False) + np.diag(s**2 / 12.0)  # + voxel extent, so 1-voxel-thick is finite
    ev = np.sort(np.linalg.eigvalsh(cov))[::-1]
    out["elongation"] = float(math.sqrt(ev[0] / ev[2]))
    out["flatness"] = float(math.sqrt(ev[1] / ev[2]))
    out["solidity"] = _solidity(mask, s, volume)
    return out


def _solidity(mask: np.ndarray, s: np.ndarray, volume: float) -> float:
    """Voxels in the mask / voxels whose centres lie in the convex hull of the mask's voxel centres
    (a filled box gives exactly 1). Masks over 50k voxels are subsampled by 2 first."""
    from scipy.spatial import ConvexHull, QhullError

    while mask.sum() > 50_000:
        mask = mask[::2, ::2, ::2]
    pts = np.argwhere(mask)
    lo, hi = pts.min(0), pts.max(0) + 1
    box = mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    surf = np.argwhere(box & ~ndimage.binary_erosion(box))
    try:
        hull = ConvexHull(surf.astype(np.float64))
    except QhullError:  # flat (one voxel thick): the mask is its own hull
        return 1.0
    cand = np.argwhere(~box).astype(np.float64)  # only voxels outside the mask can add to the hull
    inside = 0
    for start in range(0, len(cand), 20_000):
        c = cand[start:start + 20_000]
        inside += int(np.all(c @ hull.equations[:, :3].T + hull.equations[:, 3] <= 1e-9, axis=1).sum())
    n = int(box.sum())
    return float(n / (n + inside))


def tumor_metrics(ct: np.ndarray, tumor: np.ndarray, organ: np.ndarray | None = None, spacing=None,
                  *, original_ct: np.ndarray | None = None, rim_mm: float = 3.0,
                  existing_tumor: np.ndarray | None = None) -> dict:
    """All numbers for one tumour (see the module docstring). ``ct`` is the synthetic CT in HU;
    ``existing_tumor``: other tumour voxels (labelled real tumours, other synthetic ones), never organ."""
    s = _spacing(spacing)
    ct = np.asarray(ct)
    tumor = np.asarray(tumor, bool)
    if tumor.shape != ct.shape:
        raise DiffTumorError(f"tumour mask: shape {tumor.shape} differs from the CT {ct.shape}")
    if not tumor.any():
        raise DiffTumorError("tumour mask: it is empty; select a layer that contains a tumour")
    organ = np.zeros_like(tumor) if organ is None else np.asarray(organ, bool)
    if existing_tumor is not None:
        other = np.asarray(existing_tumor, bool)
        if other.shape != tumor.shape:
            raise DiffTumorError(f"labelled tumours: shape {other.shape} differs from the CT {ct.shape}")
        organ = organ & ~other
    shell = rim_mask(tumor, s, rim_mm)
    rim = shell & organ
    if not rim.any():  # no organ given (or the tumour lies outside it): the whole shell
        rim = shell
    background = organ & ~tumor & ~shell
    if not background.any():  # tumour fills the organ (or no organ given): use a 3..10 mm shell
        background = rim_mask(tumor, s, rim_mm + 7.0) & ~shell
    m: dict = {}
    m["mean_hu"], m["std_hu"], m["n_voxels"] = region_stats(ct, tumor)
    m["rim_mean_hu"], m["rim_std_hu"], _ = region_stats(ct, rim)
    m["organ_mean_hu"], m["organ_std_hu"], _ = region_stats(ct, background)
    m["contrast_hu"] = m["mean_hu"] - m["organ_mean_hu"]

    hp = highpass_residual(ct)
    std_t, std_b = _robust_std(hp[_interior(tumor)]), _robust_std(hp[_interior(background)])
    m["noise_ratio"] = std_t / std_b if std_b > 0 else float("nan")
    r = m["noise_ratio"]
    m["noise_similarity"] = float(min(r, 1 / r)) if r > 0 and np.isfinite(r) else 0.0

    grad = np.sqrt(sum(g.astype(np.float64) ** 2 for g in np.gradient(ct.astype(np.float32), *s)))
    m["edge_gradient_hu_per_mm"] = float(grad[boundary_voxels(tumor)].mean())
    signed = signed_distance_mm(tumor, s)  # once for both profiles
    d, prof = edge_profile(ct, tumor, s, signed=signed)
    m["edge_width_mm"] = edge_width_mm(d, prof)
    d_step, prof_step = edge_profile((~tumor).astype(np.float32), tumor, s, signed=signed)
    m["edge_width_step_mm"] = edge_width_mm(d_step, prof_step)
    m.update(shape_metrics(tumor, s))

    if original_ct is not None:
        inner = tumor | shell
        shell = rim_mask(inner, s, 10.0)
        diff = np.abs(ct.astype(np.float64) - np.asarray(original_ct, np.float64))
        m["shell_change_hu"] = float(diff[shell].mean()) if shell.any() else float("nan")
    m["inplane_spacing_mm"] = float(max(s[1], s[2]))
    return m


def _interior(mask: np.ndarray, depth: int = 2) -> np.ndarray:
    """``mask`` eroded by ``depth`` voxels (keeps the high-pass residual away from edges); the
    largest erosion that still leaves 8 voxels."""
    for d in range(depth, 0, -1):
        inner = ndimage.binary_erosion(mask, iterations=d)
        if inner.sum() >= 8:
            return inner
    return mask


def _robust_std(values: np.ndarray) -> float:
    """1.4826 x median absolute deviation: a noise std that ignores a few edge outliers."""
    if values.size == 0:
        return float("nan")
    v = values.astype(np.float64)
    return float(1.4826 * np.median(np.abs(v - np.median(v))))


def failure_flags(metrics: dict, th: FlagThresholds = FlagThresholds()) -> dict[str, str]:
    """Automatic failure flags: ``{category: reason}`` for each category that fires."""
    flags: dict[str, str] = {}
    width = metrics.get("edge_width_mm", float("nan"))
    step = metrics.get("edge_width_step_mm", float("nan"))
    if not np.isfinite(step):  # metrics from elsewhere: a step sampled at spacing s measures about 0.8 s
        step = 0.8 * metrics.get("inplane_spacing_mm", 1.0)
    if np.isfinite(width) and width < th.sharp_edge_factor * step:
        flags["too_sharp_edge"] = (f"edge rises within {width:.1f} mm, about as fast as a bare step on this grid "
                                   f"({step:.1f} mm)")
    sph, elo, sol = (metrics.get(k, float("nan")) for k in ("sphericity", "elongation", "solidity"))
    shape = []
    if np.isfinite(sph) and sph < th.min_sphericity:
        shape.append(f"sphericity {sph:.2f} < {th.min_sphericity}")
    if np.isfinite(elo) and elo > th.max_elongation:
        shape.append(f"elongation {elo:.1f} > {th.max_elongation}")
    if np.isfinite(sol) and sol < th.min_solidity:
        shape.append(f"solidity {sol:.2f} < {th.min_solidity}")
    if shape:
        flags["sickle_or_strip_shape"] = "; ".join(shape)
    mean, organ = metrics.get("mean_hu", float("nan")), metrics.get("organ_mean_hu", float("nan"))
    if np.isfinite(mean) and mean < th.fat_max_hu:
        flags["fat_density"] = f"mean {mean:.0f} HU < {th.fat_max_hu:.0f} HU"
    elif np.isfinite(mean) and abs(mean) <= th.fluid_abs_hu and np.isfinite(organ) and organ >= th.contrast_organ_min_hu:
        flags["fluid_density"] = f"mean {mean:.0f} HU is water-like in an enhanced organ ({organ:.0f} HU)"
    sim = metrics.get("noise_similarity", float("nan"))
    if np.isfinite(sim) and sim < th.noise_similarity_min:
        flags["noise_mismatch"] = (f"high-pass noise ratio {metrics['noise_ratio']:.2f} "
                                   f"(outside [{th.noise_similarity_min}, {1 / th.noise_similarity_min:g}])")
    change, diam = metrics.get("shell_change_hu"), metrics.get("equivalent_diameter_mm", 0.0)
    if change is not None and np.isfinite(change) and diam >= th.mass_effect_min_diameter_mm and change < th.mass_effect_min_change_hu:
        flags["no_mass_effect"] = (f"{diam:.0f} mm tumour but the tissue around it is unchanged "
                                   f"(mean |change| {change:.1f} HU within {th.mass_effect_shell_mm:.0f} mm)")
    return flags


# --------------------------------------------------------------------------------------------
# Review log
# --------------------------------------------------------------------------------------------
@dataclass
class Review:
    """One reviewer's verdict on one synthetic tumour."""

    case: str
    tumor: str
    reviewer: str = ""
    method: str = ""
    seed: str = ""
    failures: tuple[str, ...] = ()
    auto_flags: tuple[str, ...] = ()
    note: str = ""

    def __post_init__(self):
        bad = [f for f in self.failures if f not in FAILURE_CATEGORIES]
        if bad:
            raise ValueError(f"unknown failure categories {bad}; allowed: {', '.join(FAILURE_CATEGORIES)}")


REVIEW_COLUMNS = ("timestamp", "case", "tumor", "reviewer", "method", "seed",
                  *FAILURE_CATEGORIES, "auto_flags", "note")


def review_row(review: Review, timestamp: str | None = None) -> list[str]:
    ts = timestamp or datetime.now(timezone.utc).isoformat(timespec="seconds")
    flags = ["1" if c in review.failures else "0" for c in FAILURE_CATEGORIES]
    return [ts, review.case, review.tumor, review.reviewer, review.method, str(review.seed), *flags,
            ";".join(review.auto_flags), " ".join(review.note.split())]


def append_review(path: str | os.PathLike, review: Review, *, timestamp: str | None = None) -> Path:
    """Append one review to a CSV that grows across sessions (header written once).

    The row is written in one ``write`` under an exclusive lock on an ``O_APPEND`` descriptor, then
    flushed and fsynced, so concurrent sessions never interleave or truncate rows. An existing file
    with a different header is refused rather than mixed.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise DiffTumorError(f"{path}: folder {path.parent} does not exist")
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(review_row(review, timestamp))
    row = buf.getvalue()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as exc:
        raise DiffTumorError(f"{path}: cannot open the review log for writing ({exc.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if os.fstat(fd).st_size == 0:
            hdr = io.StringIO()
            csv.writer(hdr, lineterminator="\n").writerow(REVIEW_COLUMNS)
            row = hdr.getvalue() + row
        else:
            with open(path, newline="", encoding="utf-8") as fh:
                header = next(csv.reader(fh), [])
            if tuple(header) != REVIEW_COLUMNS:
                raise DiffTumorError(f"{path}: not a DiffTumor review log (its header differs); choose another file")
        os.write(fd, row.encode("utf-8"))
        os.fsync(fd)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    return path


def read_reviews(path: str | os.PathLike) -> list[dict]:
    """All rows of a review log as dicts (empty list if the file does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def metric_rows(metrics: dict) -> list[tuple[str, str]]:
    """(label, formatted value) pairs for display, in a fixed reading order."""
    spec = [("Tumour mean ± std (HU)", ("mean_hu", "std_hu")), ("3 mm rim mean ± std (HU)", ("rim_mean_hu", "rim_std_hu")),
            ("Organ mean ± std (HU)", ("organ_mean_hu", "organ_std_hu")), ("Contrast to organ (HU)", ("contrast_hu",)),
            ("Noise ratio (high-pass std)", ("noise_ratio",)), ("Noise similarity (0-1)", ("noise_similarity",)),
            ("Edge gradient (HU/mm)", ("edge_gradient_hu_per_mm",)), ("Edge 10-90% width (mm)", ("edge_width_mm",)),
            ("Volume (ml)", ("volume_ml",)), ("Equivalent diameter (mm)", ("equivalent_diameter_mm",)),
            ("Sphericity", ("sphericity",)), ("Elongation", ("elongation",)), ("Solidity", ("solidity",)),
            ("Change around tumour (HU)", ("shell_change_hu",))]
    rows = []
    for label, keys in spec:
        vals = [metrics.get(k) for k in keys]
        if any(v is None for v in vals):
            continue
        rows.append((label, " ± ".join("n/a" if not np.isfinite(v) else f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}" for v in vals)))
    return rows


__all__ = [
    "FAILURE_CATEGORIES", "FlagThresholds", "Review", "REVIEW_COLUMNS", "append_review", "read_reviews",
    "tumor_metrics", "failure_flags", "shape_metrics", "rim_mask", "region_stats", "edge_profile", "signed_distance_mm",
    "edge_width_mm", "surface_area_mm2", "metric_rows", "review_row",
]
