"""Per-case segmentation metrics, as reported in the paper (Tables 2, 4-6).

Arrays are binary numpy volumes in any axis order; ``spacing`` is given in the SAME order as the
array axes (for a ``backend.io`` volume in (z, y, x) layout pass ``geometry.spacing[::-1]``).

Definitions (also written to every evaluation's JSON):

* **DSC** = 2|P ∩ G| / (|P| + |G|). Both empty -> 1 (nothing to find, nothing predicted);
  exactly one empty -> 0.
* **NSD** (normalised surface Dice, Nikolov et al. 2021, arXiv:2111.05408) at tolerance τ mm =
  (area of ∂P within τ of ∂G + area of ∂G within τ of ∂P) / (area of ∂P + area of ∂G), with
  surfaces and surface-element areas computed as in DeepMind's ``surface-distance`` package
  (MONAI ``compute_surface_dice(..., use_subvoxels=True)`` with the voxel spacing in mm).
  Same empty conventions as DSC.
* **Tumours** are the connected components of the reference tumour mask under 26-connectivity
  (voxels sharing a face, an edge or a corner); predicted tumours are the 26-connected components
  of the prediction. Two detection rules (:data:`DETECTION_RULES`):

  - ``overlap`` (the default): a reference tumour is **detected** when some predicted component
    has Dice >= 0.1 with it (2|T ∩ P| / (|T| + |P|), computed per pair of components; the threshold
    is ``min_dice``). A **false positive** is a predicted component that matches no reference
    tumour that way. A few stray voxels inside a large tumour, or one blob covering half the organ,
    therefore detect nothing and count as false positives.
  - ``any-voxel``: a reference tumour is detected when at least ``min_overlap_voxels`` (1)
    predicted voxels lie inside it; a false positive is a predicted component touching no reference
    tumour voxel. Lenient: a model predicting noise all over the organ scores a high sensitivity
    (with many false positives), so always read it with the false positives per case.
* A tumour's **size** is its largest 3D diameter in mm: the largest distance between two corners
  of its voxels (the Feret diameter of the voxelised object). Bins: ``lt20mm`` (< 20 mm, early
  tumours), ``20_50mm`` (20-50 mm), ``gt50mm`` (> 50 mm).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from itertools import product

import numpy as np
from scipy import ndimage

# 26-connectivity in 3D (8 in 2D): every neighbour sharing a face, an edge or a corner.
CONNECTIVITY = 26
SIZE_BINS: tuple[tuple[str, float, float], ...] = (
    ("lt20mm", 0.0, 20.0),
    ("20_50mm", 20.0, 50.0),
    ("gt50mm", 50.0, float("inf")),
)

NSD_DEFINITION = (
    "NSD = normalised surface Dice at tolerance tau mm (Nikolov et al. 2021): (area of the predicted "
    "surface within tau of the reference surface + area of the reference surface within tau of the "
    "predicted surface) / (total predicted surface area + total reference surface area); surfaces and "
    "surface-element areas as in DeepMind's surface-distance package (MONAI compute_surface_dice with "
    "use_subvoxels=True and the voxel spacing in mm). Both masks empty -> 1, exactly one empty -> 0."
)


def _check_pair(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, ref = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    return pred, ref


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice similarity coefficient 2|P∩G| / (|P| + |G|); 1 when both are empty, 0 when one is."""
    pred, ref = _check_pair(pred, ref)
    denom = int(pred.sum()) + int(ref.sum())
    if denom == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, ref).sum()) / denom


def surface_dice(
    pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...], tolerance_mm: float = 2.0
) -> float:
    """Normalised surface Dice at ``tolerance_mm`` (see the module docstring); 1 / 0 for empties."""
    import torch
    from monai.metrics import compute_surface_dice

    pred, ref = _check_pair(pred, ref)
    if len(spacing) != pred.ndim:
        raise ValueError(f"spacing {tuple(spacing)} does not match a {pred.ndim}-D array")
    if tolerance_mm < 0 or not np.isfinite(tolerance_mm):
        raise ValueError(f"tolerance_mm must be a finite number >= 0, got {tolerance_mm}")
    has_pred, has_ref = bool(pred.any()), bool(ref.any())
    if not has_pred and not has_ref:
        return 1.0
    if has_pred != has_ref:
        return 0.0
    # Crop to the union's bounding box plus a one-voxel margin: the surfaces are unchanged and the
    # distance transforms run on a small box instead of the whole CT.
    union = np.logical_or(pred, ref)
    box = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in ndimage.find_objects(union.astype(np.uint8))[0])
    p = torch.from_numpy(np.ascontiguousarray(pred[box]))[None, None].float()  # (1, 1, *spatial)
    r = torch.from_numpy(np.ascontiguousarray(ref[box]))[None, None].float()
    with warnings.catch_warnings():  # MONAI 1.5+ warns about its own internal use of a deprecated argument
        warnings.simplefilter("ignore", FutureWarning)
        value = compute_surface_dice(
            p, r, class_thresholds=[float(tolerance_mm)], include_background=True,
            spacing=[float(s) for s in spacing], use_subvoxels=True,
        )
    return float(value.reshape(-1)[0])


def components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Label the 26-connected (8 in 2D) components of a binary mask: (labels int32, count)."""
    mask = np.asarray(mask, dtype=bool)
    structure = np.ones((3,) * mask.ndim, dtype=bool)
    labels, n = ndimage.label(mask, structure=structure)
    return labels.astype(np.int32, copy=False), int(n)


def largest_diameter_mm(component: np.ndarray, spacing: tuple[float, ...]) -> float:
    """Largest distance (mm) between two voxel corners of a binary object (its Feret diameter)."""
    component = np.asarray(component, dtype=bool)
    if not component.any():
        return 0.0
    # Only boundary voxels can hold the extreme corners.
    boundary = component & ~ndimage.binary_erosion(component)
    idx = np.argwhere(boundary).astype(np.float64)
    corners = np.array(list(product((0.0, 1.0), repeat=component.ndim)))
    pts = (idx[:, None, :] + corners[None, :, :]).reshape(-1, component.ndim) * np.asarray(spacing, float)
    pts = np.unique(pts, axis=0)
    if len(pts) > 64:
        from scipy.spatial import ConvexHull

        try:
            pts = pts[ConvexHull(pts).vertices]
        except Exception:  # noqa: BLE001 - cannot happen for voxel corners (never flat); all points stay exact
            pass
    best = 0.0
    for start in range(0, len(pts), 2048):  # chunked pairwise distances, bounded memory
        d = np.linalg.norm(pts[start : start + 2048, None, :] - pts[None, :, :], axis=-1)
        best = max(best, float(d.max()))
    return best


def size_bin(diameter_mm: float) -> str:
    """Name of the size bin (``lt20mm``, ``20_50mm``, ``gt50mm``) holding ``diameter_mm``: below 20 mm is
    early, 20 to 50 mm both included is the middle bin, above 50 mm the last (the paper's < 20, 20-50, > 50)."""
    if diameter_mm < SIZE_BINS[0][2]:
        return SIZE_BINS[0][0]
    return next(name for name, _, hi in SIZE_BINS[1:] if diameter_mm <= hi)


@dataclass
class Detection:
    """Tumour-wise detection counts for one case."""

    tumors: int = 0
    detected: int = 0
    false_positives: int = 0
    by_size: dict[str, tuple[int, int]] = field(default_factory=dict)  # bin -> (tumors, detected)
    diameters_mm: list[float] = field(default_factory=list)


DETECTION_RULES = ("overlap", "any-voxel")


def component_dice(ref_labels: np.ndarray, n_ref: int, pred_labels: np.ndarray, n_pred: int):
    """Dice of every touching (reference component, predicted component) pair: arrays ``(ref_id, pred_id, dice)``
    (ids from 1; pairs that share no voxel have Dice 0 and are not listed)."""
    ref_size = np.bincount(ref_labels.ravel(), minlength=n_ref + 1)
    pred_size = np.bincount(pred_labels.ravel(), minlength=n_pred + 1)
    both = (ref_labels > 0) & (pred_labels > 0)
    pair = ref_labels[both].astype(np.int64) * (n_pred + 1) + pred_labels[both]
    keys, inter = np.unique(pair, return_counts=True)
    ref_id, pred_id = keys // (n_pred + 1), keys % (n_pred + 1)
    return ref_id, pred_id, 2.0 * inter / (ref_size[ref_id] + pred_size[pred_id])


def tumor_detection(
    pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...], *, rule: str = "overlap",
    min_dice: float = 0.1, min_overlap_voxels: int = 1,
) -> Detection:
    """Count reference tumours, detected ones and false positives under ``rule`` (module docstring):
    ``"overlap"`` (a predicted component with Dice >= ``min_dice``) or ``"any-voxel"`` (>=
    ``min_overlap_voxels`` predicted voxels inside the tumour)."""
    if rule not in DETECTION_RULES:
        raise ValueError(f"rule must be one of {', '.join(DETECTION_RULES)}, got {rule!r}")
    if not 0.0 < min_dice <= 1.0:
        raise ValueError(f"min_dice must be in (0, 1], got {min_dice}")
    pred, ref = _check_pair(pred, ref)
    ref_labels, n_ref = components(ref)
    pred_labels, n_pred = components(pred)
    out = Detection(by_size={name: (0, 0) for name, _, _ in SIZE_BINS})
    out.tumors = n_ref
    if rule == "overlap":
        ref_id, pred_id, dsc = component_dice(ref_labels, n_ref, pred_labels, n_pred)
        match = dsc >= min_dice
        hits = np.zeros(n_ref + 1, bool)
        hits[ref_id[match]] = True
        out.false_positives = n_pred - len(np.unique(pred_id[match]))
    else:
        hits = np.bincount(ref_labels[pred], minlength=n_ref + 1) >= min_overlap_voxels  # predicted voxels per id
        if n_pred:
            touching = np.unique(pred_labels[ref & pred])
            out.false_positives = n_pred - int(np.count_nonzero(touching))
    for i, sl in enumerate(ndimage.find_objects(ref_labels), start=1):
        diameter = largest_diameter_mm(ref_labels[sl] == i, spacing)
        hit = bool(hits[i])
        name = size_bin(diameter)
        t, d = out.by_size[name]
        out.by_size[name] = (t + 1, d + int(hit))
        out.detected += int(hit)
        out.diameters_mm.append(diameter)
    return out


def sensitivity(detected: int, tumors: int) -> float:
    """Tumour-wise sensitivity detected / tumors; NaN when there is no reference tumour."""
    return float(detected) / tumors if tumors else float("nan")
