"""Confounds: properties other than the tumor that tell the classes apart, found at ``study create``.

Readers should tell real from synthetic tumors by the tumors. If the real cases come from a 1 mm
CT and the synthetic ones from a 3 mm CT, the readers see staircase edges, blur and a different
noise level instead, and a study measures the sources, not the synthesis. :func:`case_statistics`
measures each case (source spacing and slice thickness, dtype, padding where the source's field of
view is smaller than the ROI, noise in the organ and high-frequency power after resampling, the
source's intensity range, the case file's size when compressed); :func:`compare_classes` turns each
statistic that differs between the classes into one warning with the numbers, and trains a trivial
cross-validated classifier (standardised logistic regression) on all of them: a high AUC means "a
reader could separate real from synthetic by these image properties alone".
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from backend.errors import DiffTumorError
from study import stats

log = logging.getLogger(__name__)

CLASSIFIER_AUC_WARN = 0.75  # cross-validated AUC above which the image statistics alone separate the classes
SEPARATION_WARN = 0.8  # one statistic's AUC (or 1 - AUC) from which it is a confound, if the difference is material


@dataclass(frozen=True)
class Statistic:
    key: str
    label: str  # what the warning calls it, with its unit
    rel_tol: float = 0.0  # class medians closer than this (relative) or
    abs_tol: float = 0.0  # than this (absolute) are not a material difference
    digits: int = 2


STATISTICS = (
    Statistic("in_plane_mm", "in-plane spacing of the source (mm)", rel_tol=0.05),
    Statistic("slice_mm", "slice thickness of the source (mm)", rel_tol=0.05),
    Statistic("padded_pct", "field of view: ROI outside the source, padded with -1024 (%)", abs_tol=2.0, digits=1),
    Statistic("noise_hu", "noise in the organ after resampling (robust high-pass std, HU)", rel_tol=0.15, digits=1),
    Statistic("high_freq_pct", "high-frequency power share in the central cube (%)", rel_tol=0.15, digits=1),
    Statistic("min_hu", "lowest source value (HU)", abs_tol=50.0, digits=0),
    Statistic("max_hu", "highest source value (HU)", abs_tol=50.0, digits=0),
    Statistic("file_bytes", "compressed case file size (bytes)", rel_tol=0.03, digits=0),
)


def _world_pitches(geometry) -> tuple[float, float]:
    """(in-plane, slice) pitch in mm: the index axes nearest LPS x/y and z."""
    d = np.abs(geometry.direction_matrix)  # rows = world axes, columns = index axes
    z_axis = int(np.argmax(d[2]))
    in_plane = [geometry.spacing[j] for j in range(3) if j != z_axis]
    return float(np.mean(in_plane)), float(geometry.spacing[z_axis])


def high_pass(arr: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    a = arr.astype(np.float32)
    return a - ndimage.uniform_filter(a, 3)


def organ_noise(arr: np.ndarray, labels: np.ndarray | None, padded: np.ndarray) -> float:
    """Robust std (1.4826 x median absolute deviation) of the high-pass image over the organ.

    The organ is label 1 of the case's mask when it has one (a ``synthesize`` label map), else the soft
    tissue of the crop (0..150 HU) outside the tumor; voxels next to padding are left out. The median
    keeps organ edges from counting as noise.
    """
    from scipy import ndimage

    if labels is not None and np.any(labels == 1):
        region = ndimage.binary_erosion(labels == 1)
    else:
        region = (arr >= 0) & (arr <= 150)
        if labels is not None:
            region &= labels == 0
    region &= ~ndimage.binary_dilation(padded, iterations=2)
    values = high_pass(arr)[region]
    if values.size < 50:
        return math.nan
    return float(1.4826 * np.median(np.abs(values - np.median(values))))


def high_frequency_share(arr: np.ndarray, cube: int = 32) -> float:
    """Share (%) of the spectral power of the central cube above half the Nyquist frequency."""
    centre = np.asarray(arr.shape) // 2
    half = np.minimum(np.asarray(arr.shape) // 2, cube // 2)
    block = arr[tuple(slice(c - h, c + h) for c, h in zip(centre, half))].astype(float)
    block -= block.mean()
    power = np.abs(np.fft.fftn(block)) ** 2
    freqs = np.meshgrid(*(np.fft.fftfreq(n) for n in block.shape), indexing="ij")
    radius = np.sqrt(sum(f * f for f in freqs))  # cycles per voxel; Nyquist 0.5
    total = power.sum()
    return math.nan if total == 0 else float(100 * power[radius > 0.25].sum() / total)


def case_statistics(volume, arr: np.ndarray, labels: np.ndarray | None, padded_fraction: float,
                    file_bytes: int | None) -> dict:
    """The statistics of one case: its source ``volume``, its study-grid array ``arr`` (what readers see)
    and the case's mask on that grid (``labels``, or None)."""
    in_plane, slice_mm = _world_pitches(volume.geometry)
    padded = arr <= -1024
    return {
        "in_plane_mm": in_plane,
        "slice_mm": slice_mm,
        "dtype": str(volume.array.dtype),
        "padded_pct": 100.0 * padded_fraction,
        "noise_hu": organ_noise(arr, labels, padded),
        "high_freq_pct": high_frequency_share(arr),
        "min_hu": float(volume.array.min()),
        "max_hu": float(volume.array.max()),
        "file_bytes": math.nan if file_bytes is None else float(file_bytes),
    }


def _fmt(value: float, digits: int) -> str:
    return stats.round_half_up(value, digits)


def _describe(values: np.ndarray, digits: int) -> str:
    lo, med, hi = np.min(values), np.median(values), np.max(values)
    if lo == hi:
        return f"{_fmt(med, digits)} (all {values.size})"
    return f"median {_fmt(med, digits)}, {_fmt(lo, digits)} to {_fmt(hi, digits)} (n={values.size})"


def numeric_confound(stat: Statistic, real: np.ndarray, synthetic: np.ndarray) -> str | None:
    """The warning for ``stat`` when it separates the classes materially, else None."""
    real, synthetic = real[~np.isnan(real)], synthetic[~np.isnan(synthetic)]
    if real.size == 0 or synthetic.size == 0:
        return None
    auc = stats.roc_auc(["real"] * real.size + ["synthetic"] * synthetic.size, np.concatenate([real, synthetic]))
    separation = max(auc, 1 - auc)
    gap = abs(float(np.median(real) - np.median(synthetic)))
    scale = max(abs(float(np.median(real))), abs(float(np.median(synthetic))), 1e-12)
    if separation < SEPARATION_WARN or gap <= stat.abs_tol or gap <= stat.rel_tol * scale:
        return None
    return (f"confound: {stat.label}: real {_describe(real, stat.digits)}, synthetic {_describe(synthetic, stat.digits)}; "
            f"it alone separates the classes with AUC {separation:.2f}")


def dtype_confound(real: list[str], synthetic: list[str]) -> str | None:
    """A warning when the source data types are distributed differently (shares differing by >= 25 points)."""
    kinds = sorted(set(real) | set(synthetic))
    share = {k: (real.count(k) / len(real), synthetic.count(k) / len(synthetic)) for k in kinds}
    if max(abs(a - b) for a, b in share.values()) < 0.25:
        return None

    def listing(values: list[str]) -> str:
        return ", ".join(f"{k} x{values.count(k)}" for k in kinds if values.count(k))

    return f"confound: source data type: real {listing(real)}, synthetic {listing(synthetic)}"


def classifier_auc(features: np.ndarray, truths: list[str]) -> tuple[float, int]:
    """Cross-validated AUC of a standardised logistic regression telling real (positive) from synthetic.

    Stratified k-fold with k = min(5, cases of the smaller class), repeated 10 times with fixed
    shuffles of the cases sorted by class and values (so the result depends on the data, not on the
    random case ids); the AUC of each repeat's out-of-fold probabilities is averaged. Missing values
    take the column median. Returns ``(nan, 0)`` with fewer than 3 cases per class.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = np.asarray([t == stats.REAL for t in truths], dtype=int)
    k = int(min(5, y.sum(), len(y) - y.sum()))
    if k < 3:
        return math.nan, 0
    x = np.array(features, dtype=float)
    x = x[:, ~np.all(np.isnan(x), axis=0)]
    medians = np.nanmedian(x, axis=0)
    x = np.where(np.isnan(x), medians, x)
    order = np.lexsort((*x.T[::-1], y))  # a canonical order of the cases
    x, y = x[order], y[order]
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    aucs = []
    for repeat in range(10):
        folds = StratifiedKFold(n_splits=k, shuffle=True, random_state=repeat)
        p = cross_val_predict(model, x, y, cv=folds, method="predict_proba")[:, 1]
        aucs.append(roc_auc_score(y, p))
    return float(np.mean(aucs)), k


def compare_classes(rows: list[dict], truths: list[str]) -> dict:
    """Warnings (one per confound, with the numbers) and the classifier's AUC for the per-case ``rows``."""
    warnings = []
    real = [r for r, t in zip(rows, truths) if t == stats.REAL]
    syn = [r for r, t in zip(rows, truths) if t == stats.SYNTHETIC]
    message = dtype_confound([r["dtype"] for r in real], [r["dtype"] for r in syn])
    if message:
        warnings.append({"statistic": "dtype", "message": message})
    used = []
    for stat in STATISTICS:
        col = np.array([r[stat.key] for r in rows], dtype=float)
        if np.all(np.isnan(col)):
            continue
        used.append(stat)
        message = numeric_confound(stat, np.array([r[stat.key] for r in real], float),
                                   np.array([r[stat.key] for r in syn], float))
        if message:
            warnings.append({"statistic": stat.key, "message": message})
    features = np.array([[r[s.key] for s in used] for r in rows], dtype=float)
    auc, folds = classifier_auc(features, truths)
    names = ", ".join(s.key for s in used)
    if not math.isnan(auc) and auc > CLASSIFIER_AUC_WARN:
        warnings.append({"statistic": "classifier", "message": (
            f"confound: a logistic regression on the image statistics ({names}) tells real from synthetic with "
            f"cross-validated AUC {auc:.2f} ({folds}-fold x 10, {len(rows)} cases): a reader could separate real from "
            "synthetic by these image properties alone")})
    return {"warnings": warnings, "classifier": {"auc": None if math.isnan(auc) else auc, "folds": folds,
                                                 "features": [s.key for s in used], "warn_above": CLASSIFIER_AUC_WARN}}


def confound_report(rows: list[dict], truths: list[str], key_dir: Path) -> dict:
    """:func:`compare_classes`, written to ``key_dir`` as ``confounds.txt`` (one line per warning, then the
    classifier's AUC) and ``confounds.json``; returns the result."""
    from backend.io import write_text_atomic

    result = compare_classes(rows, truths)
    lines = [w["message"] for w in result["warnings"]]
    auc = result["classifier"]["auc"]
    lines.append("classifier: " + ("too few cases for a cross-validated AUC (needs 3 per class)" if auc is None else
                                   f"cross-validated AUC {auc:.2f} on {', '.join(result['classifier']['features'])} "
                                   f"(warning above {result['classifier']['warn_above']})"))
    write_text_atomic(key_dir / "confounds.txt", "\n".join(lines) + "\n")
    write_text_atomic(key_dir / "confounds.json", json.dumps(result, indent=2) + "\n")
    return result


def check_confounds(rows: list[dict], truths: list[str], key_dir: Path, *, strict: bool = False) -> None:
    """:func:`confound_report` into the key, its warnings logged; with ``strict`` any confound refuses the study."""
    confounds = confound_report(rows, truths, key_dir)
    for w in confounds["warnings"]:
        log.warning("%s", w["message"])
    if confounds["classifier"]["auc"] is not None:
        log.info("confound check: a classifier on the image statistics alone reaches cross-validated AUC %.2f",
                 confounds["classifier"]["auc"])
    if strict and confounds["warnings"]:
        names = ", ".join(w["statistic"] for w in confounds["warnings"])
        raise DiffTumorError(f"study --strict: {len(confounds['warnings'])} confound(s) between the real and synthetic "
                             f"cases ({names}); nothing was written")
