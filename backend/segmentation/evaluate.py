"""Score segmentation files against reference labels, like the paper's Tables 2 and 4-6.

Layers: :func:`score_case` (arrays -> one row), :func:`iter_evaluate` (file pairs -> rows +
skipped cases, a progress generator), :func:`summarize` (rows -> mean ± std per organ and fold),
:func:`write_report` (tables, figure, JSON). Metric definitions live in :mod:`.metrics`.

Outputs of :func:`write_report` in ``out``:

* ``cases.csv``: one row per scored case: ``case_id, organ, fold, dsc, nsd, tumors, detected,
  false_positives, sensitivity, tumors_<bin>, detected_<bin>`` for the bins ``lt20mm``,
  ``20_50mm``, ``gt50mm``, ``organ_dsc``, ``diameters_mm`` (";"-joined), ``pred``, ``label``.
  DSC/NSD/sensitivity are fractions in [0, 1].
* ``summary.csv`` / ``summary.md``: per organ (and per fold, plus an "all" row per organ when folds
  are known): number of cases, mean and std of DSC/NSD/organ DSC, pooled tumour-wise sensitivity
  (sum detected / sum tumours) followed by the false positives per case and the detection rule
  (``EvaluationConfig.detection``: ``overlap`` = component Dice >= 0.1, the default, or ``any-voxel``),
  then the sensitivity per size bin.
* ``skipped.csv``: ``case_id, reason`` for every case that could not be scored.
* ``summary.png``: DSC/NSD per organ (box plots) and sensitivity by tumour size.
* ``evaluation.json``: settings, metric definitions (NSD included) and the overall summary.
* ``.difftumor-evaluate.json``: the files this evaluation wrote in ``out`` (size + SHA-256,
  :mod:`backend.manifest`). A later evaluation into the same folder replaces or removes only those, and
  only while unchanged; any other file in its way is refused before anything is scored or written.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from backend.errors import DiffTumorError
from backend.segmentation import metrics as M

log = logging.getLogger(__name__)

BIN_NAMES = tuple(name for name, _, _ in M.SIZE_BINS)
CASE_COLUMNS = (
    ["case_id", "organ", "fold", "dsc", "nsd", "tumors", "detected", "false_positives", "sensitivity"]
    + [f"{kind}_{b}" for b in BIN_NAMES for kind in ("tumors", "detected")]
    + ["organ_dsc", "diameters_mm", "pred", "label"]
)


@dataclass
class EvaluationConfig:
    """How label values are read and how surfaces are compared."""

    tumor_label: int = 2  # tumour value in the reference labels
    organ_label: int | None = None  # organ value; when set, tumour predictions are kept inside the organ
    pred_tumor_label: int | None = None  # tumour value in the predictions (None: same as tumor_label)
    pred_organ_label: int | None = None  # organ value in the predictions, for organ DSC (None: organ_label)
    tolerance_mm: float = 2.0  # NSD tolerance tau
    organ: str = "tumor"  # name used for grouping when the fold file gives none
    detection: str = "overlap"  # tumour-wise detection rule: "overlap" (component Dice) or "any-voxel"
    detection_min_dice: float = 0.1  # "overlap": Dice a predicted component needs with a real tumour
    min_overlap_voxels: int = 1  # "any-voxel": predicted voxels inside a real tumour needed to call it detected
    allow_empty_labels: bool = False  # score all-zero labels as tumour-free cases instead of skipping them

    def __post_init__(self):
        if not (self.tolerance_mm >= 0 and math.isfinite(self.tolerance_mm)):
            raise DiffTumorError(f"--tolerance-mm: must be a finite number >= 0, got {self.tolerance_mm}")
        if self.detection not in M.DETECTION_RULES:
            raise DiffTumorError(f"--detection: {self.detection!r} is not one of {', '.join(M.DETECTION_RULES)}")
        if not 0.0 < self.detection_min_dice <= 1.0:
            raise DiffTumorError(f"--detection-min-dice: must be in (0, 1], got {self.detection_min_dice}")
        if self.min_overlap_voxels < 1:
            raise DiffTumorError(f"min_overlap_voxels: must be >= 1, got {self.min_overlap_voxels}")
        if self.organ_label is not None and self.organ_label == self.tumor_label:
            raise DiffTumorError(f"--organ-label: {self.organ_label} equals --tumor-label")


# ------------------------------------------------------------------------------- label maps
MAX_LABEL_VALUE = 65535  # label maps hold small whole numbers; larger values mean an intensity image
MAX_LABELS = 256  # distinct values (background included) a label map may hold (TotalSegmentator: 118)


def label_values(array: np.ndarray, name: str) -> np.ndarray:
    """Sorted distinct values of a label map.

    Raises :class:`DiffTumorError` naming ``name`` when ``array`` is not a label map: values that
    are not whole numbers (a probability map), negative (a CT in HU), above
    :data:`MAX_LABEL_VALUE` or more than :data:`MAX_LABELS` distinct ones (an intensity image).
    """
    arr = np.asarray(array)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    if not np.issubdtype(arr.dtype, np.integer):
        finite = np.isfinite(arr)
        if not finite.all():
            raise DiffTumorError(f"{name}: not a label map: non-finite values (NaN or inf)")
        fractional = arr != np.round(arr)
        if fractional.any():
            example = float(arr[fractional].flat[0])
            raise DiffTumorError(f"{name}: not a label map: non-integer values (e.g. {example:g}; a probability map?)")
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    lo, hi = arr.min(), arr.max()
    if lo < 0:
        raise DiffTumorError(f"{name}: not a label map: negative values (down to {lo:g}; a CT?)")
    if hi > MAX_LABEL_VALUE:
        raise DiffTumorError(f"{name}: not a label map: values up to {hi:g} (label values are at most {MAX_LABEL_VALUE})")
    values = np.flatnonzero(np.bincount(arr.ravel().astype(np.int64, copy=False)))
    if len(values) > MAX_LABELS:
        raise DiffTumorError(f"{name}: not a label map: {len(values)} distinct values (at most {MAX_LABELS}; a CT?)")
    return values


def _check_label_values(cfg: EvaluationConfig, found: set[int], files: int) -> None:
    """Refuse a --tumor-label / --organ-label that occurs in none of the label files read."""
    if not files:
        return
    shown = sorted(found)
    listed = ", ".join(str(v) for v in shown[:20]) + (f", ... ({len(shown)} values)" if len(shown) > 20 else "")
    where = f"occurs in none of the {files} label file(s) (their values: {listed})"
    if cfg.organ_label is not None and cfg.organ_label not in found:
        raise DiffTumorError(f"--organ-label {cfg.organ_label}: {where}")
    if cfg.tumor_label not in found and not cfg.allow_empty_labels:
        raise DiffTumorError(
            f"--tumor-label {cfg.tumor_label}: {where}; pass --allow-empty-labels if every case is tumour-free"
        )


# ---------------------------------------------------------------------------------- one case
def score_case(
    pred: np.ndarray,
    label: np.ndarray,
    spacing: tuple[float, ...],
    cfg: EvaluationConfig,
    organ_mask: np.ndarray | None = None,
) -> dict:
    """Metrics of one case. ``pred``/``label`` are integer label arrays on one grid, ``spacing`` in
    array-axis order. The tumour prediction is restricted to ``organ_mask`` when given, else to the
    reference organ (organ or tumour value) when ``cfg.organ_label`` is set."""
    pred_tumor_value = cfg.tumor_label if cfg.pred_tumor_label is None else cfg.pred_tumor_label
    ref_tumor = label == cfg.tumor_label
    pred_tumor = pred == pred_tumor_value
    ref_organ = None
    if cfg.organ_label is not None:
        ref_organ = (label == cfg.organ_label) | ref_tumor
    restrict = organ_mask if organ_mask is not None else ref_organ
    if restrict is not None:
        pred_tumor &= np.asarray(restrict, dtype=bool)
    det = M.tumor_detection(pred_tumor, ref_tumor, spacing, rule=cfg.detection, min_dice=cfg.detection_min_dice,
                            min_overlap_voxels=cfg.min_overlap_voxels)
    row = {
        "dsc": M.dice(pred_tumor, ref_tumor),
        "nsd": M.surface_dice(pred_tumor, ref_tumor, spacing, cfg.tolerance_mm),
        "tumors": det.tumors,
        "detected": det.detected,
        "false_positives": det.false_positives,
        "sensitivity": M.sensitivity(det.detected, det.tumors),
        "organ_dsc": float("nan"),
        "diameters_mm": ";".join(f"{d:.1f}" for d in det.diameters_mm),
    }
    for b in BIN_NAMES:
        row[f"tumors_{b}"], row[f"detected_{b}"] = det.by_size[b]
    if ref_organ is not None:
        pred_organ_value = cfg.organ_label if cfg.pred_organ_label is None else cfg.pred_organ_label
        pred_organ = (pred == pred_organ_value) | (pred == pred_tumor_value)
        row["organ_dsc"] = M.dice(pred_organ, ref_organ)
    return row


# ----------------------------------------------------------------------------- pairing files
def _case_files(path: Path, what: str) -> dict[str, Path]:
    from backend.io import image_suffix, strip_image_suffix

    if not path.exists():
        raise DiffTumorError(f"{path}: {what} path does not exist")
    if path.is_file():
        return {strip_image_suffix(path): path}
    files = {strip_image_suffix(p): p for p in sorted(path.iterdir()) if p.is_file() and image_suffix(p)}
    if not files:
        raise DiffTumorError(f"{path}: {what} folder holds no image files (.nii.gz, .nii, .nrrd, .mha, .mhd)")
    return files


def pair_files(pred: Path, label: Path, organ_masks: Path | None = None):
    """Pair prediction and label files by case name -> (pairs, skipped).

    ``pairs`` = [(case_id, pred_path, label_path, organ_mask_path | None)]; a single file on both
    sides is one pair whatever the names. ``skipped`` = [(case_id, reason)].
    """
    pred, label = Path(pred), Path(label)
    preds, labels = _case_files(pred, "prediction"), _case_files(label, "label")
    masks = _case_files(Path(organ_masks), "organ mask") if organ_masks is not None else None
    if pred.is_file() and label.is_file():
        (cid,) = labels
        preds = {cid: next(iter(preds.values()))}
        if masks is not None and Path(organ_masks).is_file():
            masks = {cid: next(iter(masks.values()))}
    pairs, skipped = [], []
    for cid in sorted(set(preds) | set(labels)):
        if cid not in labels:
            skipped.append((cid, f"{preds[cid]}: no label file named {cid}.* in {label}"))
        elif cid not in preds:
            skipped.append((cid, f"{labels[cid]}: no prediction file named {cid}.* in {pred}"))
        elif masks is not None and cid not in masks:
            skipped.append((cid, f"{labels[cid]}: no organ mask named {cid}.* in {organ_masks}"))
        else:
            pairs.append((cid, preds[cid], labels[cid], masks[cid] if masks is not None else None))
    return pairs, skipped


# ------------------------------------------------------------------------------- fold files
def read_fold_file(path: Path) -> dict[str, dict]:
    """case_id -> {"fold": str, "organ": str | None} from a split JSON or a CSV.

    JSON: the split file written by training (``{"folds": [{"fold": 0, "val": [...]}, ...],
    "organs": {case: organ}}``; a case's fold is the fold whose ``val`` lists it). CSV: columns
    ``case_id,fold`` and optionally ``organ``.
    """
    path = Path(path)
    if not path.is_file():
        raise DiffTumorError(f"{path}: fold file does not exist")
    out: dict[str, dict] = {}
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            organs = data.get("organs", {})
            for f in data["folds"]:
                for cid in f["val"]:
                    cid = _case_id(cid)
                    out[cid] = {"fold": str(f["fold"]), "organ": organs.get(cid)}
        except (ValueError, KeyError, TypeError) as exc:
            raise DiffTumorError(f"{path}: not a split file (expected {{'folds': [{{'fold', 'val'}}]}}: {exc})") from None
        return out
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or "case_id" not in reader.fieldnames or "fold" not in reader.fieldnames:
            raise DiffTumorError(f"{path}: fold CSV needs the columns case_id,fold (optionally organ)")
        for r in reader:
            out[_case_id(r["case_id"])] = {"fold": str(r["fold"]), "organ": r.get("organ") or None}
    return out


def select_fold(fold_map: dict[str, dict], fold, path) -> dict[str, dict]:
    """The entries of ``fold_map`` (:func:`read_fold_file`) in fold ``fold``; one line when it has none."""
    known = sorted({v["fold"] for v in fold_map.values()}, key=lambda f: (len(f), f))
    if str(fold) not in known:
        raise DiffTumorError(f"{path}: no fold {fold} (folds: {', '.join(known) or 'none'})")
    return {c: v for c, v in fold_map.items() if v["fold"] == str(fold)}


def _case_id(name: str) -> str:
    from backend.io import strip_image_suffix

    return strip_image_suffix(str(name))


# ---------------------------------------------------------------------------------- all cases
def iter_evaluate(pairs, cfg: EvaluationConfig, folds: dict[str, dict] | None = None, skipped=None):
    """Score every pair; yields ``(message, done, total)`` and returns ``(rows, skipped)``.

    A case that cannot be scored (unreadable file, not a label map, grids differ, empty label, ...)
    is logged and added to ``skipped`` as ``(case_id, reason)``; the other cases continue. Raises
    :class:`DiffTumorError` when ``cfg.organ_label`` or ``cfg.tumor_label`` occurs in none of the
    label files read (a wrong value would score every case as empty against empty); an all
    tumour-free set is accepted with ``cfg.allow_empty_labels``.
    """
    from backend.io import check_same_grid, read_image

    skipped = list(skipped or [])
    rows = []
    folds = folds or {}
    present = {cid for cid, *_ in pairs}
    for cid in sorted(set(folds) - present - {c for c, _ in skipped}):
        skipped.append((cid, f"case {cid} is listed in the fold file but has no prediction/label pair"))
    for cid, reason in skipped:
        log.warning("skipped %s: %s", cid, reason)
    total = len(pairs)
    found: set[int] = set()  # values met in the label files
    labels_read = 0
    for done, (cid, pred_path, label_path, mask_path) in enumerate(pairs):
        yield f"scoring {cid}", done, total
        try:
            label = read_image(label_path)
            found.update(label_values(label.array, str(label_path)).tolist())
            labels_read += 1
            pred = read_image(pred_path)
            label_values(pred.array, str(pred_path))
            check_same_grid(label, pred, names=(str(label_path), str(pred_path)))
            organ_mask = None
            if mask_path is not None:
                mvol = read_image(mask_path)
                check_same_grid(label, mvol, names=(str(label_path), str(mask_path)))
                organ_mask = mvol.array > 0
            if not cfg.allow_empty_labels and not np.any(label.array):
                raise DiffTumorError(
                    f"{label_path}: label is empty (all voxels 0); pass --allow-empty-labels to score it as tumour-free"
                )
            row = score_case(pred.array, label.array, tuple(label.spacing[::-1]), cfg, organ_mask)
        except DiffTumorError as exc:
            log.warning("skipped %s: %s", cid, exc)
            skipped.append((cid, str(exc)))
            continue
        info = folds.get(cid, {})
        row.update(
            case_id=cid, organ=info.get("organ") or cfg.organ, fold=info.get("fold", ""),
            pred=str(pred_path), label=str(label_path),
        )
        rows.append(row)
    _check_label_values(cfg, found, labels_read)
    yield "done", total, total
    return rows, skipped


# ------------------------------------------------------------------------------------ summary
def _mean_std(values) -> tuple[float, float]:
    v = np.asarray([x for x in values if x == x], dtype=float)  # drop NaN
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else float("nan")


def _summary_row(organ: str, fold: str, rows: list[dict], detection: str) -> dict:
    out = {"organ": organ, "fold": fold, "cases": len(rows)}
    for key in ("dsc", "nsd", "organ_dsc"):
        out[f"{key}_mean"], out[f"{key}_std"] = _mean_std(r[key] for r in rows)
    tumors = sum(r["tumors"] for r in rows)
    out["tumors"] = tumors
    out["sensitivity"] = M.sensitivity(sum(r["detected"] for r in rows), tumors)
    # false positives per case beside the sensitivity: a high sensitivity means little with many of them
    out["fp_per_case"] = float(np.mean([r["false_positives"] for r in rows])) if rows else float("nan")
    out["detection"] = detection
    for b in BIN_NAMES:
        t = sum(r[f"tumors_{b}"] for r in rows)
        out[f"tumors_{b}"] = t
        out[f"sensitivity_{b}"] = M.sensitivity(sum(r[f"detected_{b}"] for r in rows), t)
    return out


def summarize(rows: list[dict], detection: str = "overlap") -> list[dict]:
    """Mean ± std per organ, per fold (when folds are known) and over all folds; ``detection`` names the
    detection rule the rows were scored with (a column of the summary)."""
    out = []
    for organ in sorted({r["organ"] for r in rows}):
        rs = [r for r in rows if r["organ"] == organ]
        folds = sorted({r["fold"] for r in rs if r["fold"] != ""}, key=lambda f: (len(f), f))
        for fold in folds:
            out.append(_summary_row(organ, fold, [r for r in rs if r["fold"] == fold], detection))
        out.append(_summary_row(organ, "all", rs, detection))
    return out


def _pct(mean: float, std: float | None = None) -> str:
    if mean != mean:
        return "–"
    return f"{100 * mean:.1f}" if std is None or std != std else f"{100 * mean:.1f} ± {100 * std:.1f}"


def summary_markdown(summary: list[dict], cfg: EvaluationConfig) -> str:
    head = ["Organ", "Fold", "Cases", "DSC (%)", f"NSD@{cfg.tolerance_mm:g}mm (%)", "Organ DSC (%)",
            "Sens. (%)", "FP/case", "Sens. <20mm", "Sens. 20-50mm", "Sens. >50mm"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summary:
        cells = [s["organ"], s["fold"], str(s["cases"]), _pct(s["dsc_mean"], s["dsc_std"]),
                 _pct(s["nsd_mean"], s["nsd_std"]), _pct(s["organ_dsc_mean"], s["organ_dsc_std"]),
                 f"{_pct(s['sensitivity'])} (n={s['tumors']})",
                 f"{s['fp_per_case']:.2f}" if s["fp_per_case"] == s["fp_per_case"] else "–"]
        cells += [f"{_pct(s[f'sensitivity_{b}'])} (n={s[f'tumors_{b}']})" for b in BIN_NAMES]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------- files
MANIFEST_NAME = ".difftumor-evaluate.json"  # the files an evaluation wrote in its --out (backend.manifest)
REPORT_FILES = ("cases.csv", "skipped.csv", "summary.csv", "summary.md", "summary.png", "evaluation.json")


def output_manifest(out: Path):
    """The :class:`backend.manifest.OutputManifest` of an evaluation's output folder."""
    from backend.manifest import OutputManifest

    return OutputManifest(Path(out), command="difftumor evaluate", name=MANIFEST_NAME)


def claim_report_files(out: Path):
    """Refuse in one line, before anything is scored or written, when a report file already in ``out`` was not
    written there by an earlier evaluation (or was changed since); returns the folder's manifest."""
    out = Path(out)
    manifest = output_manifest(out)
    manifest.claim(out / name for name in REPORT_FILES)
    return manifest


def _csv_text(rows: list[dict], columns: list[str]) -> str:
    import io

    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if isinstance(v, float) and v != v else v) for k, v in r.items()})
    return buf.getvalue()


def definitions(cfg: EvaluationConfig) -> dict:
    return {
        "dsc": "2|P∩G|/(|P|+|G|) on the tumour masks; both empty -> 1, one empty -> 0",
        "nsd": M.NSD_DEFINITION.replace("tolerance tau mm", f"tolerance tau = {cfg.tolerance_mm:g} mm"),
        "tumor": f"{M.CONNECTIVITY}-connected component of the reference tumour mask",
        **detection_definitions(cfg),
        "sensitivity": "pooled over cases: sum(detected) / sum(tumors)",
        "size": "largest 3D diameter (Feret, voxel corners) in mm; bins <20 (early), 20-50, >50 mm",
        "organ_restriction": "tumour predictions are kept only inside the organ mask (organ-mask files, else the "
        "reference organ incl. tumour) when an organ label or organ masks are given",
    }


def detection_definitions(cfg: EvaluationConfig) -> dict:
    """What "detected" and "false positive" mean under the configured rule (:mod:`.metrics`)."""
    if cfg.detection == "overlap":
        return {
            "detection_rule": f"overlap: component Dice >= {cfg.detection_min_dice:g}",
            "detected": f"a reference tumour that some 26-connected predicted tumour component overlaps with Dice >= "
            f"{cfg.detection_min_dice:g} (2|T∩P|/(|T|+|P|) of the two components)",
            "false_positive": f"a 26-connected predicted tumour component with Dice >= {cfg.detection_min_dice:g} with "
            "no reference tumour",
        }
    return {
        "detection_rule": f"any-voxel: >= {cfg.min_overlap_voxels} predicted voxel(s) inside the tumour",
        "detected": f"a reference tumour with >= {cfg.min_overlap_voxels} predicted tumour voxel(s) inside it",
        "false_positive": "a 26-connected predicted tumour component overlapping no reference tumour voxel",
    }


def definitions_markdown(cfg: EvaluationConfig, *, organ_masks: bool = False) -> str:
    """The metric definitions under the table (evaluation.json holds them too)."""
    d = definitions(cfg)
    if organ_masks:
        where = "tumour predictions were kept only inside the organ-mask files"
    elif cfg.organ_label is not None:
        where = f"tumour predictions were kept only inside the reference organ (label {cfg.organ_label} or tumour)"
    else:
        where = "tumour predictions were scored as they are (no --organ-label or --organ-masks given)"
    lines = [
        "DSC, NSD, organ DSC: mean ± std over the cases (%). Sensitivity: tumour-wise, pooled over the cases "
        f"(n = reference tumours), detection rule '{cfg.detection}'. FP/case: false-positive predicted tumour "
        "components per case.",
        "",
        f"- DSC: {d['dsc']}",
        f"- NSD: {d['nsd'].removeprefix('NSD = ')}",
        f"- Tumour: {d['tumor']}; detected ({cfg.detection}): {d['detected']}; false positive: {d['false_positive']}",
        f"- Size: {d['size']}",
        f"- Organ: {where}",
    ]
    return "\n".join(lines) + "\n"


def write_report(out: Path, rows: list[dict], skipped: list[tuple[str, str]], cfg: EvaluationConfig, *,
                 organ_masks: bool = False) -> dict:
    """Write cases.csv, skipped.csv, summary.csv/.md, summary.png and evaluation.json; return the summary."""
    from backend.io import write_text_atomic

    out = Path(out)
    manifest = claim_report_files(out)
    out.mkdir(parents=True, exist_ok=True)

    def put(name: str, text: str) -> None:
        manifest.record(write_text_atomic(out / name, text))

    rows = sorted(rows, key=lambda r: r["case_id"])
    put("cases.csv", _csv_text(rows, CASE_COLUMNS))
    put("skipped.csv", _csv_text([{"case_id": c, "reason": r} for c, r in skipped], ["case_id", "reason"]))
    summary = summarize(rows, cfg.detection)
    if summary:
        put("summary.csv", _csv_text(summary, list(summary[0])))
    md = summary_markdown(summary, cfg) + "\n" + definitions_markdown(cfg, organ_masks=organ_masks)
    if skipped:
        md += f"\n{len(skipped)} case(s) skipped, see skipped.csv.\n"
    put("summary.md", md)
    if rows:
        from backend.segmentation.figures import summary_figure

        manifest.record(summary_figure(rows, summary, out / "summary.png", cfg.tolerance_mm))
    meta = {
        "settings": asdict(cfg),
        "definitions": definitions(cfg),
        "cases_scored": len(rows),
        "cases_skipped": len(skipped),
        "summary": [{k: (None if isinstance(v, float) and v != v else v) for k, v in s.items()} for s in summary],
    }
    put("evaluation.json", json.dumps(meta, indent=2, ensure_ascii=False))
    return {"summary": summary, "markdown": md}


def evaluate_files(
    pred: Path, label: Path, out: Path, cfg: EvaluationConfig, *, folds: Path | None = None,
    organ_masks: Path | None = None, fold: int | str | None = None, skipped: list[tuple[str, str]] | None = None,
) -> Iterator:
    """Generator: pair files, score them, write the report; returns ``(rows, skipped, summary)``.
    ``fold`` keeps only that fold's cases of the fold file (the others are not expected). Nothing
    is written when no case can be scored: the error names the first skipped case and its reason
    (every reason is logged). ``skipped`` lists cases already left out, e.g. by the inference run."""
    claim_report_files(out)  # a file of the user's in the way: refused before any case is scored
    pairs, unpaired = pair_files(pred, label, organ_masks)
    skipped = list(skipped or []) + unpaired
    fold_map = read_fold_file(folds) if folds is not None else None
    if fold is not None:  # only that fold's cases are scored (as --model predicts only them)
        if fold_map is None:
            raise DiffTumorError(f"--fold {fold}: needs --folds (the run's splits.json or a case_id,fold CSV)")
        fold_map = select_fold(fold_map, fold, folds)
        outside = [cid for cid, *_ in pairs if cid not in fold_map]
        if outside:
            log.info("%d case(s) not in fold %s of %s are not scored (e.g. %s)", len(outside), fold, folds, outside[0])
        pairs = [p for p in pairs if p[0] in fold_map]
        skipped = [(c, r) for c, r in skipped if c in fold_map]
    rows, skipped = yield from iter_evaluate(pairs, cfg, fold_map, skipped)
    if not rows:
        first = f"; {skipped[0][0]}: {skipped[0][1]}" if skipped else ""
        more = f" (and {len(skipped) - 1} more skipped case(s), logged above)" if len(skipped) > 1 else ""
        raise DiffTumorError(f"{label}: no case could be scored{first}{more}")
    report = write_report(out, rows, skipped, cfg, organ_masks=organ_masks is not None)
    return rows, skipped, report["summary"]
