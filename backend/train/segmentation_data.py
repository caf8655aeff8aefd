"""Stage-3 data: the cases of a run as MONAI dictionaries, their checks, and the transforms they go through.

    build_items(cfg, out_dir) -> (train items, val items, splits)   k-fold split of the real cases (+ healthy,
                                                                    presynthesized), ``splits.json`` reused
    check_items(items) -> (usable, skipped)                         image/label grids from the headers only
    build_transforms(cfg, train=)                                   appendix E.2 + on-the-fly tumour synthesis
    CaseErrors(dataset, items)                                      a case's user error as one line naming it
    user_error(exc)                                                 the DiffTumorError behind a worker's error
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from backend.data import label_for
from backend.errors import DiffTumorError

if TYPE_CHECKING:  # pragma: no cover
    from backend.train.segmentation import SegmentationConfig


def _read_grid(path: str):
    """The voxel grid of an image file from its header only (no voxel data read)."""
    import SimpleITK as sitk

    from backend.io import Geometry, read_image

    p = Path(path)
    if p.is_dir():  # a DICOM series: read it whole
        return read_image(p).geometry
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return read_image(p).geometry  # raises the one-line reason
    if reader.GetDimension() != 3:
        return read_image(p).geometry  # 4D with one frame is fine; others raise the one-line reason
    return Geometry(reader.GetSize(), reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection())


def check_items(items: list[dict], *, threads: int = 8) -> tuple[list[dict], list[tuple[str, str]]]:
    """Split ``items`` into usable ones and ``(case, reason)`` for cases whose image or label cannot be read
    or whose label is not on the image's grid. Headers only, so it is quick on large datasets."""
    from concurrent.futures import ThreadPoolExecutor

    from backend.io import check_same_grid

    def reason(item: dict) -> str | None:
        try:
            check_same_grid(_read_grid(item["image"]), _read_grid(item["label"]), names=(item["image"], item["label"]))
        except DiffTumorError as exc:
            return str(exc)
        return None

    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(items)))) as pool:
        reasons = list(pool.map(reason, items))
    ok = [it for it, r in zip(items, reasons) if r is None]
    skipped = [(it["name"], r) for it, r in zip(items, reasons) if r is not None]
    return ok, skipped


def write_skipped(path: Path, skipped: list[tuple[str, str, str]]) -> None:
    """``case,role,reason`` of the cases left out (header only when none was)."""
    import csv
    import io

    from backend.io import write_text_atomic

    text = io.StringIO()
    w = csv.writer(text, lineterminator="\n")
    w.writerow(["case", "role", "reason"])
    w.writerows(skipped)
    write_text_atomic(path, text.getvalue())


def build_items(cfg: SegmentationConfig, out_dir: Path, *, write: bool = True):
    """(train items, val items, splits) as MONAI dicts; writes (``write``) or reuses ``splits.json``."""
    from backend.data import list_cases
    from backend.segmentation.splits import fold_cases, load_splits, make_kfold, save_splits

    if cfg.data.real is None and cfg.data.healthy is None and cfg.data.presynthesized is None:
        raise DiffTumorError("data: give data.real, data.healthy and/or data.presynthesized")
    real = list_cases(cfg.data.real, require_labels=True) if cfg.data.real else []
    healthy = list_cases(cfg.data.healthy, require_labels=True) if cfg.data.healthy else []
    h_values = cfg.data.healthy_organ_values or cfg.data.organ_values
    by_name = {}
    for c in real:
        path, _ = label_for(c, cfg.organ)
        by_name[c.name] = {"image": str(c.image), "label": path, "name": c.name, "healthy": 0,
                           "label_values": (tuple(cfg.data.organ_values), tuple(cfg.data.tumor_values))}
    for c in healthy:
        path, binary = label_for(c, cfg.organ)
        by_name[c.name] = {"image": str(c.image), "label": path, "name": c.name, "healthy": 1,
                           "label_values": ((1,) if binary else tuple(h_values), ())}
    split_path = out_dir / "splits.json"
    if cfg.data.split_file:
        splits = load_splits(Path(cfg.data.split_file))
    elif split_path.is_file():
        splits = load_splits(split_path)
    else:
        splits = make_kfold([c.name for c in real], [c.name for c in healthy], k=cfg.data.folds,
                            seed=cfg.data.split_seed, organ=cfg.organ)
    missing = sorted({n for f in splits["folds"] for n in f["train"] + f["val"]} - set(by_name))
    if missing:
        raise DiffTumorError(f"split file: {len(missing)} case(s) not in the data sources (first: {missing[0]})")
    if write:
        save_splits(splits, split_path)
    split_name = cfg.data.split_file or split_path
    train, val = fold_cases(splits, cfg.data.fold, where=f"data.fold={cfg.data.fold}: split file {split_name}")
    if not cfg.data.use_real_for_training:
        train = [n for n in train if by_name[n]["healthy"]]
    extra = []
    if cfg.data.presynthesized:
        for c in list_cases(cfg.data.presynthesized, require_labels=True):
            path, binary = label_for(c, cfg.organ)
            extra.append({"image": str(c.image), "label": path, "name": f"presynthesized/{c.name}", "healthy": 0,
                          "label_values": ((1,), ()) if binary else ((1,), (2,))})
    if not train and not extra:
        raise DiffTumorError("data: no training case left (synthetic-only runs need data.healthy or "
                             "data.presynthesized)")
    return [by_name[n] for n in train] + extra, [by_name[n] for n in val], splits


def build_transforms(cfg: SegmentationConfig, *, train: bool):
    """Appendix E.2: orientation, 1 mm, HU window, pad/crop 96³, rotate-90, intensity shift, synthesis."""
    from monai import transforms as T

    from backend.organs import parse_organ
    from backend.segmentation.transforms import (
        FOREGROUND_RADIUS_MM,
        LoadVolumed,
        MapLabelsd,
        RandOrganCropd,
        RandTumorSynthesisd,
    )

    keys = ["image", "label"]
    lo, hi = cfg.hu_range
    xs = [
        LoadVolumed(keys),  # (1, X, Y, Z) MetaTensors with the RAS affine (any format backend.io reads)
        MapLabelsd("label", values_key="label_values"),
        T.Orientationd(keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),  # explicit: no FutureWarning
        T.Spacingd(keys, pixdim=(1.0, 1.0, 1.0), mode=("bilinear", "nearest")),
        T.ScaleIntensityRanged("image", a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True),
    ]
    if not train:
        return T.Compose(xs + [T.EnsureTyped(keys, dtype=(torch.float32, torch.uint8), track_meta=False)])
    pos, neg = cfg.data.pos_neg
    radius = cfg.data.foreground_radius or FOREGROUND_RADIUS_MM[parse_organ(cfg.organ)]
    xs += [
        T.SpatialPadd(keys, spatial_size=cfg.roi_size, value=0),
        # the release's crop: pos : neg around the label, healthy crops retried until they hold enough organ
        # (crop-centre candidates are found once per draw, not cached: for a whole CT they take hundreds of MB)
        RandOrganCropd(keys, "label", cfg.roi_size, radius=radius, pos=pos, neg=neg, image_key="image",
                       image_threshold=0, max_tries=cfg.data.crop_tries),
        T.RandRotate90d(keys, prob=cfg.rotate90_prob, max_k=3),
        T.RandShiftIntensityd("image", offsets=cfg.shift_intensity, prob=cfg.shift_intensity_prob),
    ]
    if cfg.synthesis.enabled:
        s = cfg.synthesis
        xs.append(RandTumorSynthesisd(keys, prob=s.prob, stage_probs=s.stage_probs, organ=cfg.organ, method=s.method,
                                      weights_dir=s.weights_dir, weights_organ=s.weights_organ, device=s.device,
                                      mass_effect=s.mass_effect))
    xs.append(T.EnsureTyped(keys, dtype=(torch.float32, torch.uint8), track_meta=False))
    return T.Compose(xs)


class CaseErrors(torch.utils.data.Dataset):
    """A MONAI dataset whose user errors (a DiffTumorError anywhere in MONAI's chain of "applying
    transform" RuntimeErrors) come out as one DiffTumorError naming the case."""

    def __init__(self, dataset, items: list[dict]):
        self.dataset, self.items = dataset, items

    @property
    def transform(self):  # SeededDraws reseeds it
        return self.dataset.transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        try:
            return self.dataset[index]
        except Exception as exc:
            cause = user_error(exc)
            if cause is None:
                raise
            raise DiffTumorError(f"training case {self.items[index]['name']}: {cause}") from None


def user_error(exc: BaseException) -> str | None:
    """The message of the DiffTumorError behind ``exc`` (its cause chain, or the text of an error a
    DataLoader worker re-raised in the main process), else None."""
    seen = exc
    while seen is not None:
        if isinstance(seen, DiffTumorError):
            text = str(seen)
            break
        seen = seen.__cause__ or seen.__context__
    else:
        text = str(exc) if "DiffTumorError: " in str(exc) else None
    if text is not None and "DiffTumorError: " in text:  # a worker's traceback text: keep its last message
        text = text.rsplit("DiffTumorError: ", 1)[1]
    return text
