"""Seeded k-fold split files for segmentation (5-fold by default), saved as JSON next to a run.

Format (also read by ``difftumor evaluate --folds``)::

    {"k": 5, "seed": 0, "organ": "liver",
     "folds": [{"fold": 0, "train": [case, ...], "val": [case, ...]}, ...],
     "healthy": [case, ...],          # healthy CTs: always in training (tumours synthesized into them)
     "organs": {case: organ, ...}}

Real-tumour cases are shuffled with ``random.Random(seed)`` and dealt into k folds of near-equal
size; fold i validates on its share and trains on the rest (plus every healthy case).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from backend.errors import DiffTumorError
from backend.io import write_text_atomic


def make_kfold(real: list[str], healthy: list[str], *, k: int = 5, seed: int = 0, organ: str = "") -> dict:
    """The split dict for case names ``real`` (k-fold) and ``healthy`` (always training)."""
    dup = sorted({n for n in real + healthy if (real + healthy).count(n) > 1})
    if dup:
        raise DiffTumorError(f"data: case names must be unique across the real and healthy sources; repeated: {', '.join(dup[:5])}")
    if k < 1:
        raise DiffTumorError(f"data.folds: must be >= 1, got {k}")
    order = sorted(real)
    random.Random(seed).shuffle(order)
    if k > 1 and len(order) < k:
        raise DiffTumorError(f"data.folds: {k} folds need at least {k} real-tumour cases, found {len(order)}")
    folds = []
    for i in range(k):
        val = sorted(order[i::k]) if k > 1 else []
        train = sorted(set(order) - set(val)) + sorted(healthy)
        folds.append({"fold": i, "train": train, "val": val})
    organs = {n: organ for n in real + healthy} if organ else {}
    return {"k": k, "seed": seed, "organ": organ, "folds": folds, "healthy": sorted(healthy), "organs": organs}


def save_splits(splits: dict, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, json.dumps(splits, indent=1))


def load_splits(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise DiffTumorError(f"{path}: split file does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        for f in data["folds"]:
            f["fold"], f["train"], f["val"]  # noqa: B018 - check the keys exist
    except (ValueError, KeyError, TypeError) as exc:
        raise DiffTumorError(f"{path}: not a split file (expected {{'folds': [{{'fold', 'train', 'val'}}]}}; {exc})") from None
    return data


def fold_cases(splits: dict, fold: int, *, where: str = "split file") -> tuple[list[str], list[str]]:
    """(train, val) case names of ``fold``."""
    for f in splits["folds"]:
        if int(f["fold"]) == int(fold):
            return list(f["train"]), list(f["val"])
    raise DiffTumorError(f"{where}: no fold {fold} (folds: {', '.join(str(f['fold']) for f in splits['folds'])})")
