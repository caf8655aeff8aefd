"""Run a trained segmentation checkpoint on a dataset: sliding-window inference in model space,
predictions written back on each CT's own grid (``backend.preprocess`` exact inverse).

:func:`predict_dataset` is a generator (``(message, done, total)``) returning
``(pred_dir, label_dir, meta)``: ``pred_dir/<case>.nii.gz`` holds 0 background / 1 organ /
2 tumour on the CT grid; ``label_dir/<case>.nii.gz`` the reference label mapped to the same
values with the checkpoint's label convention (so both can be scored by name).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from backend.errors import DiffTumorError

log = logging.getLogger(__name__)


def load_segmentation_model(path, device):
    """(model in eval mode, checkpoint dict) from a ``difftumor train segmentation`` checkpoint."""
    from backend.checkpoint import load_checkpoint
    from backend.segmentation.networks import NetworkConfig, build_network

    ck = load_checkpoint(path)
    if ck.get("stage") != "segmentation":
        raise DiffTumorError(f"{path}: not a segmentation checkpoint (stage {ck.get('stage')!r})")
    mc = dict(ck["model_config"])
    mc["roi_size"] = tuple(mc["roi_size"])
    mc["unet_channels"] = tuple(mc["unet_channels"])
    model = build_network(NetworkConfig(**mc))
    model.load_state_dict(ck["model"])
    return model.to(device).eval(), ck


def map_labels(arr: np.ndarray, organ_values, tumor_values) -> np.ndarray:
    out = np.zeros(arr.shape, np.uint8)
    out[np.isin(arr, list(organ_values))] = 1
    out[np.isin(arr, list(tumor_values))] = 2
    return out


@torch.no_grad()
def predict_volume(model, ct, *, roi_size, overlap: float, sw_batch_size: int, device, hu_range=(-175.0, 250.0)):
    """Label map (z, y, x) uint8 on ``ct``'s grid: model space -> sliding window -> argmax -> back."""
    from monai.inferers import sliding_window_inference

    from backend.preprocess import from_model_space, hu_to_unit, to_model_space

    ms = to_model_space(ct)
    x = hu_to_unit(torch.from_numpy(ms.array.astype(np.float32)), "[0,1]", window=hu_range)
    xt = x[None, None].to(device)  # (1, 1, X, Y, Z)
    logits = sliding_window_inference(xt, tuple(roi_size), sw_batch_size, model, overlap=overlap, mode="gaussian")
    pred = logits.argmax(1)[0].to(torch.uint8).cpu().numpy()  # (X, Y, Z)
    return from_model_space(pred, ms, is_label=True, dtype=np.uint8)


def predict_dataset(model_path, data, out_dir, *, folds=None, fold=None, overlap=0.75, sw_batch_size=2, device="auto"):
    """Generator: predict every labelled case of ``data`` (only fold ``fold``'s validation cases
    when a split file and fold are given); returns ``(pred_dir, label_dir, meta)``."""
    from backend.data import label_for as _label_for
    from backend.data import list_cases
    from backend.device import resolve_device
    from backend.io import check_same_grid, read_image, write_image
    from backend.segmentation.evaluate import read_fold_file, select_fold

    if not 0.0 <= overlap < 1.0:
        raise DiffTumorError(f"--overlap: must be in [0, 1), got {overlap}")
    if sw_batch_size < 1:
        raise DiffTumorError(f"--sw-batch-size: must be a positive integer, got {sw_batch_size}")
    dev = resolve_device(device)
    model, ck = load_segmentation_model(model_path, dev)
    cfg = ck["config"]
    organ = ck.get("organ", cfg.get("organ", "tumor"))
    cases = list_cases(data, require_labels=True)
    skipped: list[tuple[str, str]] = []  # (case, reason): listed in the evaluation's skipped.csv
    if fold is not None:
        if folds is None:
            raise DiffTumorError("--fold: needs --folds (the run's splits.json)")
        val = list(select_fold(read_fold_file(folds), fold, folds))  # a split JSON or a case_id,fold CSV
        names = {c.name for c in cases}
        cases = [c for c in cases if c.name in set(val)]
        if not cases:
            raise DiffTumorError(f"{folds}: fold {fold} names none of the cases in {data}")
        skipped += [(n, f"{folds}: fold {fold} lists it, but {data} has no case of that name") for n in val if n not in names]
    _warn_training_cases(cases, model_path, ck, folds)
    organ_values, tumor_values = cfg["data"]["organ_values"], cfg["data"]["tumor_values"]
    out_dir = Path(out_dir)
    pred_dir, label_dir = out_dir / "pred", out_dir / "labels"
    manifest, stale = claim_prediction_folders(out_dir, [c.name for c in cases])
    created = [d for d in (out_dir, pred_dir, label_dir) if not d.exists()]  # the handler may remove them if empty
    pred_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    for f in stale:  # our own files of an earlier run into this --out would be scored with these
        manifest.remove(f)
    if stale:
        log.info("%s: removed %d file(s) this command wrote in an earlier evaluation (not among this run's cases)",
                 out_dir, len(stale))
    for i, case in enumerate(cases):
        yield f"predicting {case.name}", i, len(cases)
        try:
            ct = read_image(case.image)
            label_path, binary = _label_for(case, organ)  # the label training read for this case
            lab = read_image(label_path)
            check_same_grid(ct, lab, names=(str(case.image), str(label_path)))
        except DiffTumorError as exc:  # evaluation lists it as a skipped case (no prediction)
            skipped.append((case.name, str(exc)))
            for folder in (pred_dir, label_dir):  # no earlier run's file for it either (ours: claimed above)
                manifest.remove(folder / f"{case.name}.nii.gz")
            continue
        pred = predict_volume(model, ct, roi_size=ck["model_config"]["roi_size"], overlap=overlap,
                              sw_batch_size=sw_batch_size, device=dev, hu_range=tuple(cfg.get("hu_range", (-175.0, 250.0))))
        manifest.record(write_image(pred, pred_dir / f"{case.name}.nii.gz", ct.geometry))
        mapped = map_labels(lab.array, (1,), ()) if binary else map_labels(lab.array, organ_values, tumor_values)
        manifest.record(write_image(mapped, label_dir / f"{case.name}.nii.gz", ct.geometry))
    yield "predicted", len(cases), len(cases)
    return pred_dir, label_dir, {"organ": organ, "overlap": overlap, "checkpoint": str(model_path), "skipped": skipped,
                                  "created": created}


def claim_prediction_folders(out_dir: Path, case_names) -> tuple:
    """Before anything is written: ``(manifest, stale)`` for ``out_dir``. Every file that is in the way (a
    prediction or label this run writes, a report file, any other file in ``pred/`` or ``labels/``, which would
    be scored with this run's cases) must be one an earlier evaluation wrote there and nobody changed since;
    else one line naming it (nothing is deleted or replaced). ``stale`` = such files of ours that this run
    does not write again: they are to be removed."""
    from backend.segmentation.evaluate import claim_report_files

    manifest = claim_report_files(out_dir)
    keep = {f"{name}.nii.gz" for name in case_names}
    stale: list[Path] = []
    for folder in (out_dir / "pred", out_dir / "labels"):
        if folder.exists() and not folder.is_dir():
            raise DiffTumorError(f"{folder}: is a file where difftumor evaluate writes a folder; move it away or choose another --out")
        manifest.claim(folder / k for k in sorted(keep))
        if folder.is_dir():
            for f in sorted(folder.iterdir()):
                if f.name in keep:
                    continue
                if f.is_dir() or not manifest.owns(f):
                    raise manifest.refusal(f)
                stale.append(f)
    return manifest, stale


def _warn_training_cases(cases, model_path, ck: dict, folds) -> None:
    """Warn when cases about to be scored were in the checkpoint's training set (its run's split file,
    ``--folds`` or ``splits.json`` beside the checkpoint, and the fold it trained on)."""
    from backend.segmentation.splits import fold_cases, load_splits

    split_path = Path(folds) if folds is not None else Path(model_path).parent / "splits.json"
    trained_fold = ck.get("config", {}).get("data", {}).get("fold")
    if trained_fold is None or not split_path.is_file():
        return
    try:
        train, _ = fold_cases(load_splits(split_path), trained_fold, where=str(split_path))
    except DiffTumorError:
        return
    seen = sorted({c.name for c in cases} & set(train))
    if seen:
        log.warning("%d of the %d case(s) to score trained this model (fold %s of %s, e.g. %s): their scores are "
                    "not held-out; add --folds %s --fold %s to score its validation cases only", len(seen), len(cases),
                    trained_fold, split_path, seen[0], split_path, trained_fold)
